//! The delivery loop: claims due deliveries from Postgres, sends them with both signatures,
//! and records what happened. Concurrency is bounded per process and per webhook, and each
//! webhook has a rate limit, so a slow or hanging receiver only ever holds its own slots.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use fieldline_common::{Context, ids::random_id};
use fieldline_proto::{InvalidateKind, v1::Invalidate};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prost::Message;
use rand::Rng;
use reqwest::{StatusCode, header::HeaderMap};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::{
    domain::{DISABLED_EVENT, EventBody, rfc3339},
    fanout::Targets,
    repo::{AttemptRecord, Claimed, NewDelivery, NewEvent, Next, Repo},
    signing, ssrf,
};

/// Most bytes of a receiver's answer kept in the delivery log.
const SNIPPET_BYTES: usize = 1024;
/// Most deliveries claimed in one query.
const CLAIM_BATCH: usize = 64;

pub struct Dispatcher {
    repo: Repo,
    targets: Targets,
    context: Context,
    http: reqwest::Client,
    gaps: Vec<Duration>,
    limiter: DefaultKeyedRateLimiter<String>,
    in_flight: Mutex<HashMap<String, usize>>,
    slots: Arc<Semaphore>,
    wake: Notify,
    /// Due rows may be waiting that no request holds: fan-out stored some without a lease,
    /// or the last claim found some or left out a webhook at its cap. Finished requests wake
    /// the claim only then; the poll covers retries coming due and other dispatchers' leases
    /// running out.
    backlog: AtomicBool,
    /// Attempts waiting to be written; the recorder writes what has gathered in one
    /// transaction.
    outcomes: mpsc::Sender<Outcome>,
    outcomes_rx: Mutex<Option<mpsc::Receiver<Outcome>>>,
}

type Outcome = (Claimed, AttemptRecord, Next);

/// A request slot of the process and of one webhook, given back when dropped.
pub struct Slot {
    dispatcher: Arc<Dispatcher>,
    webhook_id: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.dispatcher.adjust_in_flight(&self.webhook_id, -1);
        self.dispatcher.slot_freed();
    }
}

/// Most attempts written in one transaction.
const RECORD_BATCH: usize = 512;

impl Dispatcher {
    pub fn new(context: &Context, repo: Repo, targets: Targets) -> anyhow::Result<Arc<Self>> {
        let config = &context.config;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.webhook_timeout)
            .connect_timeout(config.webhook_timeout.min(Duration::from_secs(5)))
            .dns_resolver(ssrf::resolver(config.webhook_allow_private))
            .user_agent(concat!("Fieldline-Webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(config.webhook_endpoint_concurrency)
            .build()?;
        let rate = NonZeroU32::new(config.webhook_rate_per_second).unwrap_or(NonZeroU32::MIN);
        let (outcomes, outcomes_rx) = mpsc::channel(config.webhook_concurrency * 4);
        Ok(Arc::new(Self {
            repo,
            targets,
            context: context.clone(),
            http,
            gaps: config.webhook_retry_gaps(),
            limiter: RateLimiter::keyed(Quota::per_second(rate)),
            in_flight: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.webhook_concurrency)),
            wake: Notify::new(),
            backlog: AtomicBool::new(true),
            outcomes,
            outcomes_rx: Mutex::new(Some(outcomes_rx)),
        }))
    }

    /// New work is queued: look now rather than at the next poll.
    pub fn wake(&self) {
        self.backlog.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// A slot came free: look now if there may be rows waiting for it.
    fn slot_freed(&self) {
        if self.backlog.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

    /// One of the process's request slots and one of the webhook's, if both are free.
    /// Fan-out takes them for the deliveries it stores already leased, so their first
    /// attempt needs no claim.
    pub fn try_slot(self: &Arc<Self>, webhook_id: &str) -> Option<Slot> {
        if !self.try_reserve(webhook_id) {
            return None;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.adjust_in_flight(webhook_id, -1);
            return None;
        };
        Some(Slot {
            dispatcher: self.clone(),
            webhook_id: webhook_id.to_owned(),
            permit: Some(permit),
        })
    }

    /// Sends a leased delivery in the background, holding `slot` until it is done.
    pub fn start(&self, delivery: Claimed, slot: Slot) {
        let dispatcher = slot.dispatcher.clone();
        self.context.tasks.spawn(async move {
            dispatcher.rate_limited_attempt(delivery).await;
            drop(slot);
        });
    }

    /// Sends a batch of one webhook's leased deliveries in the background, as one request.
    fn start_batch(&self, deliveries: Vec<Claimed>, slot: Slot) {
        let dispatcher = slot.dispatcher.clone();
        self.context.tasks.spawn(async move {
            dispatcher
                .limiter
                .until_key_ready(&deliveries[0].webhook_id)
                .await;
            let results = dispatcher.send_batch(&deliveries).await;
            for (delivery, (record, next)) in deliveries.into_iter().zip(results) {
                if dispatcher
                    .outcomes
                    .send((delivery, record, next))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "attempt recorder gone; the lease runs out and the delivery is retried"
                    );
                }
            }
            drop(slot);
        });
    }

    /// The lease a claim takes: long enough for the request, its rate-limit wait and the
    /// bookkeeping; a dispatcher killed mid-attempt gives the delivery back when it runs out.
    pub fn lease(&self) -> Duration {
        self.context.config.webhook_timeout + Duration::from_secs(15)
    }

    /// Webhooks with every slot taken, and the free slots of those with some taken.
    fn busy(&self) -> (Vec<String>, Vec<(String, i64)>) {
        let cap = self.context.config.webhook_endpoint_concurrency;
        let in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut saturated = Vec::new();
        let mut partial = Vec::new();
        for (id, count) in in_flight.iter() {
            if *count >= cap {
                saturated.push(id.clone());
            } else {
                partial.push((id.clone(), (cap - count) as i64));
            }
        }
        (saturated, partial)
    }

    fn adjust_in_flight(&self, webhook_id: &str, delta: isize) {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = in_flight.entry(webhook_id.to_owned()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            in_flight.remove(webhook_id);
        }
    }

    /// Writes finished attempts in batches. After shutdown it keeps writing until no request
    /// is in flight (bounded by the process's shutdown timeout); an attempt never written is
    /// retried when its lease runs out (at least once, never lost).
    pub async fn record(self: Arc<Self>) {
        let Some(mut receiver) = self
            .outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let shutdown = self.context.shutdown.clone();
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        loop {
            let first = if shutdown.is_cancelled() {
                // No new requests from here on (fan-out then stores its rows unleased), so
                // that none starts after the last outcome is written.
                self.slots.close();
                // Requests still in flight report until the process's shutdown timeout: an
                // outcome not written would be sent again by another dispatcher.
                let all_idle =
                    self.slots.available_permits() == self.context.config.webhook_concurrency;
                match tokio::time::timeout(Duration::from_millis(200), receiver.recv()).await {
                    Ok(Some(outcome)) => outcome,
                    Ok(None) => break,
                    Err(_) if all_idle => break,
                    Err(_) => continue,
                }
            } else {
                tokio::select! {
                    outcome = receiver.recv() => match outcome {
                        Some(outcome) => outcome,
                        None => break,
                    },
                    _ = shutdown.cancelled() => continue,
                }
            };
            batch.push(first);
            while batch.len() < RECORD_BATCH {
                match receiver.try_recv() {
                    Ok(outcome) => batch.push(outcome),
                    Err(_) => break,
                }
            }
            self.write(&batch).await;
            batch.clear();
            self.slot_freed();
        }
    }

    async fn write(&self, batch: &[Outcome]) {
        for (_, record, next) in batch {
            self.count(record, next);
        }
        match self
            .repo
            .finish_attempts(batch, self.context.config.webhook_disable_after_failing)
            .await
        {
            Ok(disabled) => {
                for (project, webhook_id) in disabled {
                    self.disabled(&project, &webhook_id).await;
                }
            }
            // The leases run out and the deliveries are claimed again: at least once.
            Err(error) => {
                tracing::warn!(error = %error, attempts = batch.len(), "recording attempts failed")
            }
        }
    }

    fn count(&self, record: &AttemptRecord, next: &Next) {
        let outcome = match next {
            Next::Succeeded => "succeeded",
            Next::RetryAt(_) => "retry",
            Next::Failed => "failed",
            Next::Gone => "gone",
        };
        metrics::counter!("fieldline_webhook_attempts_total", "outcome" => outcome).increment(1);
        metrics::histogram!("fieldline_webhook_attempt_seconds")
            .record(f64::from(record.latency_ms) / 1000.0);
        if !matches!(next, Next::RetryAt(_)) {
            let result = if *next == Next::Succeeded {
                "succeeded"
            } else {
                "failed"
            };
            metrics::counter!("fieldline_webhook_deliveries_total", "result" => result)
                .increment(1);
        }
    }

    /// Runs until shutdown.
    pub async fn run(self: Arc<Self>) {
        let shutdown = self.context.shutdown.clone();
        let poll = self.context.config.webhook_poll_interval;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let free = self.slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => continue,
                    _ = tokio::time::sleep(poll) => continue,
                }
            }
            let (saturated, partial) = self.busy();
            let claimed = match self
                .repo
                .claim(
                    free.min(CLAIM_BATCH) as i64,
                    self.context.config.webhook_endpoint_concurrency as i64,
                    &saturated,
                    &partial,
                    self.lease(),
                )
                .await
            {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(error = %error, "claiming deliveries failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Until a claim comes back empty, and while a webhook at its cap was left out of
            // it, there may be more: finished requests look again.
            self.backlog.store(
                !claimed.is_empty() || !saturated.is_empty(),
                Ordering::Release,
            );
            if claimed.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            let mut over_cap = Vec::new();
            let mut batched: HashMap<String, Vec<Claimed>> = HashMap::new();
            for delivery in claimed {
                if delivery.options.batch.is_some() {
                    batched
                        .entry(delivery.webhook_id.clone())
                        .or_default()
                        .push(delivery);
                    continue;
                }
                // Fan-out may have taken the slots since the claim; past them rows go back.
                match self.try_slot(&delivery.webhook_id) {
                    Some(slot) => self.start(delivery, slot),
                    None => over_cap.push(delivery.delivery_id),
                }
            }
            // A batched webhook's rows go out a batch per slot.
            for (webhook_id, deliveries) in batched {
                let size = deliveries[0]
                    .options
                    .batch
                    .map_or(1, |batch| batch.max_events.max(1) as usize);
                let mut rest = deliveries.into_iter().peekable();
                while rest.peek().is_some() {
                    let batch: Vec<Claimed> = rest.by_ref().take(size).collect();
                    match self.try_slot(&webhook_id) {
                        Some(slot) => self.start_batch(batch, slot),
                        None => over_cap.extend(batch.into_iter().map(|d| d.delivery_id)),
                    }
                }
            }
            if !over_cap.is_empty()
                && let Err(error) = self.repo.release(&over_cap).await
            {
                // Their leases run out and they are claimed again then.
                tracing::warn!(error = %error, "releasing deliveries failed");
            }
        }
    }

    /// Takes one of a webhook's slots if it has one free.
    fn try_reserve(&self, webhook_id: &str) -> bool {
        let cap = self.context.config.webhook_endpoint_concurrency;
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = in_flight.entry(webhook_id.to_owned()).or_default();
        if *count >= cap {
            return false;
        }
        *count += 1;
        true
    }

    async fn rate_limited_attempt(&self, delivery: Claimed) {
        self.limiter.until_key_ready(&delivery.webhook_id).await;
        let (record, next) = self.send(&delivery).await;
        if self.outcomes.send((delivery, record, next)).await.is_err() {
            tracing::warn!("attempt recorder gone; the lease runs out and the delivery is retried");
        }
    }

    /// Sends one claimed delivery now and records the outcome before returning
    /// (`POST …/test`).
    pub async fn attempt(
        &self,
        delivery: &Claimed,
    ) -> Result<AttemptRecord, fieldline_common::ApiError> {
        let (record, next) = self.send(delivery).await;
        self.count(&record, &next);
        let outcome = [(delivery.clone(), record.clone(), next)];
        let disabled = self
            .repo
            .finish_attempts(&outcome, self.context.config.webhook_disable_after_failing)
            .await?;
        for (project, webhook_id) in disabled {
            self.disabled(&project, &webhook_id).await;
        }
        Ok(record)
    }

    /// A webhook was just disabled here: every dispatcher hears of it, and the project's
    /// other webhooks that subscribe to `webhook.disabled` get that event. The event is
    /// stored after the disable committed; a crash in between loses the notice, never a
    /// delivery.
    async fn disabled(&self, project: &str, webhook_id: &str) {
        tracing::warn!(webhook_id = %webhook_id, project = %project, "webhook disabled");
        self.broadcast_change(project, webhook_id).await;
        if let Err(error) = self.announce_disabled(project, webhook_id).await {
            tracing::warn!(error = %error, webhook_id = %webhook_id, "could not queue webhook.disabled");
        }
    }

    async fn announce_disabled(
        &self,
        project: &str,
        webhook_id: &str,
    ) -> Result<(), fieldline_common::ApiError> {
        let Some(notice) = self.repo.disabled_notice(project, webhook_id).await? else {
            return Ok(());
        };
        if notice.targets.is_empty() {
            return Ok(());
        }
        let event_id = random_id("evt_", 24);
        let disabled_at = notice.disabled_at.unwrap_or_else(Utc::now);
        let payload = serde_json::json!({
            "webhook_id": webhook_id,
            "name": notice.name,
            "reason": notice.reason,
            "disabled_at": rfc3339(disabled_at),
            "failing_since": notice.failing_since.map(rfc3339),
        });
        let body = EventBody {
            id: &event_id,
            event: DISABLED_EVENT,
            timestamp: rfc3339(disabled_at),
            project,
            device_id: None,
            payload: &payload,
        }
        .to_json();
        let deliveries: Vec<NewDelivery> = notice
            .targets
            .into_iter()
            .map(|target| NewDelivery {
                id: random_id("dlv_", 24),
                webhook_id: target,
                project: project.to_owned(),
                event_id: event_id.clone(),
                event_type: DISABLED_EVENT.to_owned(),
                device_id: None,
                immediate: false,
                webhook_enabled: true,
                leased: false,
            })
            .collect();
        let event = NewEvent {
            id: event_id.clone(),
            project: project.to_owned(),
            event_type: DISABLED_EVENT.to_owned(),
            device_id: None,
            body,
            traceparent: None,
        };
        self.repo
            .enqueue(&[event], &deliveries, self.lease())
            .await?;
        self.wake();
        Ok(())
    }

    /// Drops the cached webhook sets here at once and tells every other dispatcher to.
    pub async fn broadcast_change(&self, project: &str, webhook_id: &str) {
        self.targets.invalidate();
        let subject = self.context.subjects.invalidate(InvalidateKind::Webhooks);
        let message = Invalidate {
            project: project.to_owned(),
            id: webhook_id.to_owned(),
        };
        if let Err(error) = self
            .context
            .nats
            .publish(subject, message.encode_to_vec().into())
            .await
        {
            tracing::warn!(error = %error, "could not broadcast a webhook change");
        }
    }

    async fn send(&self, delivery: &Claimed) -> (AttemptRecord, Next) {
        let rendered = crate::shape::render(&delivery.options, &delivery.body);
        let (record, status, retry_after) = self
            .request(delivery, &[], rendered, &delivery.event_id, None)
            .await;
        // Refused before sending (a private address, a template that fails): final.
        let next = if status.is_none() && self.refused(&record) {
            Next::Failed
        } else {
            self.next_step(status, retry_after, delivery.attempts)
        };
        (record, next)
    }

    /// Sends several deliveries of one webhook as one request (a batch): one body, one
    /// `webhook-id` of its own, signed once; every delivery gets the request's outcome.
    async fn send_batch(&self, deliveries: &[Claimed]) -> Vec<(AttemptRecord, Next)> {
        let Some(first) = deliveries.first() else {
            return Vec::new();
        };
        let batch_id = random_id("bat_", 24);
        let bodies: Vec<&str> = deliveries.iter().map(|d| d.body.as_str()).collect();
        let rendered = crate::shape::render_batch(&first.options, &bodies);
        let (record, status, retry_after) = self
            .request(
                first,
                &deliveries[1..],
                rendered,
                &batch_id,
                Some(batch_id.clone()),
            )
            .await;
        let refused = status.is_none() && self.refused(&record);
        metrics::histogram!("fieldline_webhook_batch_events").record(deliveries.len() as f64);
        // One retry time for the whole batch, so that it is retried whole; a member whose
        // own retries are spent ends failed.
        let youngest = deliveries.iter().map(|d| d.attempts).min().unwrap_or(1);
        let shared = self.next_step(status, retry_after, youngest);
        deliveries
            .iter()
            .map(|delivery| {
                let next = if refused {
                    Next::Failed
                } else {
                    match self.next_step(status, retry_after, delivery.attempts) {
                        Next::RetryAt(_) => shared.clone(),
                        other => other,
                    }
                };
                (record.clone(), next)
            })
            .collect()
    }

    /// Whether an attempt was refused before any request (see [`Dispatcher::request`]).
    fn refused(&self, record: &AttemptRecord) -> bool {
        record
            .error
            .as_deref()
            .is_some_and(|error| error.starts_with("refused:") || error.starts_with("template:"))
    }

    /// One POST of a rendered body, signed with `message_id`. Returns the attempt, the
    /// status (none when no answer came) and the receiver's `Retry-After`.
    async fn request(
        &self,
        delivery: &Claimed,
        also: &[Claimed],
        rendered: Result<crate::shape::Rendered, String>,
        message_id: &str,
        batch_id: Option<String>,
    ) -> (AttemptRecord, Option<StatusCode>, Option<Duration>) {
        // The attempt's span joins its event's trace (a batch: the first event's, linked to
        // the others'); the receiver gets its `traceparent` to continue it.
        let span = tracing::info_span!(
            "webhook attempt",
            otel.name = "webhook attempt",
            otel.kind = "client",
            http.request.method = "POST",
            webhook.id = %delivery.webhook_id,
            webhook.delivery.id = %delivery.delivery_id,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if fieldline_common::trace::enabled() {
            fieldline_common::trace::set_parent(
                &span,
                fieldline_common::trace::from_traceparent(delivery.traceparent.as_deref()),
            );
            for other in also {
                fieldline_common::trace::add_link(
                    &span,
                    &fieldline_common::trace::from_traceparent(other.traceparent.as_deref()),
                );
            }
        }
        let outcome = tracing::Instrument::instrument(
            self.attempt_in(delivery, rendered, message_id, batch_id, span.clone()),
            span.clone(),
        )
        .await;
        match outcome.1 {
            Some(status) => {
                span.record("http.response.status_code", status.as_u16());
                if !status.is_success() {
                    span.record("otel.status_code", "ERROR");
                }
            }
            None => {
                span.record("otel.status_code", "ERROR");
            }
        }
        outcome
    }

    async fn attempt_in(
        &self,
        delivery: &Claimed,
        rendered: Result<crate::shape::Rendered, String>,
        message_id: &str,
        batch_id: Option<String>,
        span: tracing::Span,
    ) -> (AttemptRecord, Option<StatusCode>, Option<Duration>) {
        let attempted_at = Utc::now();
        let started = Instant::now();
        // A URL stored while private targets were allowed (or by an older release) is checked
        // again here: the resolver only sees host names, never IP literals. Refused is
        // final; it would be refused the same way on every retry. So is a body the webhook's
        // template cannot make.
        let refused = reqwest::Url::parse(&delivery.url)
            .map_err(|error| format!("refused: the URL does not parse ({error})"))
            .and_then(|url| ssrf::check_target(&url, self.context.config.webhook_allow_private))
            .and(rendered);
        let rendered = match refused {
            Ok(rendered) => rendered,
            Err(reason) => {
                tracing::warn!(webhook_id = %delivery.webhook_id, reason = %reason, "delivery refused");
                let record = AttemptRecord {
                    attempted_at,
                    status_code: None,
                    latency_ms: 0,
                    error: Some(reason),
                    snippet: None,
                    batch_id,
                };
                return (record, None, None);
            }
        };
        let body = rendered.body.into_bytes();
        let mut request = self
            .http
            .post(&delivery.url)
            .header("content-type", rendered.content_type.as_str());
        for (name, value) in &rendered.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in fieldline_common::trace::headers_of(&span) {
            request = request.header(name, value);
        }
        if let Some(custom) = delivery.headers.as_object() {
            for (name, value) in custom {
                if let Some(value) = value.as_str() {
                    request = request.header(name.as_str(), value);
                }
            }
        }
        let signatures = signing::headers(
            &delivery.secret,
            delivery.previous_secret.as_deref(),
            message_id,
            attempted_at.timestamp(),
            &body,
        );
        for (name, value) in signatures {
            request = request.header(name, value);
        }
        let result = request.body(body).send().await;
        let (status, snippet, retry_after, error) = match result {
            Ok(response) => {
                let status = response.status();
                let retry_after = retry_after(response.headers());
                let snippet = read_snippet(response).await;
                let error = (!status.is_success()).then(|| format!("HTTP {}", status.as_u16()));
                (Some(status), snippet, retry_after, error)
            }
            Err(error) => (None, None, None, Some(describe(&error))),
        };
        let record = AttemptRecord {
            attempted_at,
            status_code: status.map(|s| i32::from(s.as_u16())),
            latency_ms: started.elapsed().as_millis().min(i32::MAX as u128) as i32,
            error,
            snippet,
            batch_id,
        };
        (record, status, retry_after)
    }

    /// The retry rules of API.md: 2xx done; 410 disables; network errors, timeouts, 408, 425,
    /// 429 and 5xx retry on the schedule (or after `Retry-After`); anything else fails now.
    fn next_step(
        &self,
        status: Option<StatusCode>,
        retry_after: Option<Duration>,
        attempts: i32,
    ) -> Next {
        let retryable = match status {
            None => true,
            Some(status) if status.is_success() => return Next::Succeeded,
            Some(StatusCode::GONE) => return Next::Gone,
            Some(status) => matches!(status.as_u16(), 408 | 425 | 429) || status.is_server_error(),
        };
        let retries_done = usize::try_from(attempts.max(1) - 1).unwrap_or(0);
        let Some(gap) = self.gaps.get(retries_done).copied().filter(|_| retryable) else {
            return Next::Failed;
        };
        let delay = match retry_after {
            Some(asked) => asked.min(self.context.config.webhook_retry_after_max),
            None => jitter(gap),
        };
        Next::RetryAt(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default())
    }
}

/// ±20 % so that receivers coming back are not hit by every retry at once.
fn jitter(gap: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..=1.2);
    gap.mul_f64(factor)
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

async fn read_snippet(mut response: reqwest::Response) -> Option<String> {
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = SNIPPET_BYTES - bytes.len();
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= SNIPPET_BYTES {
            break;
        }
    }
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).into_owned())
}

/// A network error without the URL (it may carry a receiver's token in its query).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_redirect() {
        "redirect"
    } else {
        "request failed"
    };
    let mut message = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let delay = jitter(Duration::from_secs(10));
            assert!(
                delay >= Duration::from_secs(8) && delay <= Duration::from_secs(12),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_or_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        headers.insert(reqwest::header::RETRY_AFTER, later.parse().unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(
            parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30),
            "{parsed:?}"
        );
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
