//! Alert rules: what a rule is, how it is checked at the edge, and the state machine that
//! turns readings into `firing` and `resolved` transitions.

use fieldline_common::ApiError;
use fieldline_common::openapi::{IdText, LabelText, NameText};
use serde::{Deserialize, Serialize};

use super::check_label;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Gt,
    Gte,
    Lt,
    Lte,
    Eq,
    Ne,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Eq => "eq",
            Op::Ne => "ne",
        }
    }

    pub fn from_db(value: &str) -> Self {
        match value {
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "eq" => Op::Eq,
            _ => Op::Ne,
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Gte => value >= threshold,
            Op::Lt => value < threshold,
            Op::Lte => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    /// The severity a name (`info`, `warning`, `critical`) spells, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|severity| severity.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// `POST` and `PUT /api/v1/alert-rules`; a PATCH is merged into the stored rule's `RuleIn`
/// form first, so every write goes through [`RuleIn::parse`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleIn {
    #[schema(value_type = NameText)]
    pub name: String,
    /// The device it watches; exactly one of `device_id` and `group` (422 otherwise).
    #[serde(default)]
    #[schema(value_type = Option<IdText>)]
    pub device_id: Option<String>,
    /// The group it watches, each device on its own.
    #[serde(default)]
    #[schema(value_type = Option<LabelText>)]
    pub group: Option<String>,
    #[schema(value_type = LabelText)]
    pub metric: String,
    pub op: Op,
    #[schema(example = 30.0)]
    pub threshold: f64,
    /// Hysteresis: the value must come back past this to resolve (at most `threshold` for
    /// gt/gte, at least it for lt/lte, none for eq/ne; 422 otherwise).
    #[serde(default)]
    pub clear_threshold: Option<f64>,
    /// Seconds the condition must hold before it fires (0 to 86400).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub for_s: Option<i32>,
    #[serde(default)]
    pub severity: Option<Severity>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A rule ready to store.
#[derive(Debug, Clone)]
pub struct NewRule {
    pub name: String,
    pub device_id: Option<String>,
    pub group: Option<String>,
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
    pub clear_threshold: Option<f64>,
    pub for_s: i32,
    pub severity: Severity,
    pub enabled: bool,
}

/// Longest `for_s`: a day.
pub const MAX_FOR_S: i32 = 86_400;

impl RuleIn {
    pub fn parse(self) -> Result<NewRule, ApiError> {
        let name = fieldline_common::names::Name::parse("name", &self.name)?;
        if let Some(device_id) = &self.device_id {
            fieldline_common::ids::DeviceId::parse(device_id).map_err(|error| {
                ApiError::bad_request("invalid_field", format!("device_id: {}", error.message))
            })?;
        }
        if let Some(group) = &self.group {
            check_label("group", group)?;
        }
        if self.device_id.is_some() == self.group.is_some() {
            return Err(ApiError::unprocessable(
                "invalid_rule_target",
                "a rule watches one device (device_id) or one group (group): give exactly one",
            ));
        }
        check_label("metric", &self.metric)?;
        if !self.threshold.is_finite() {
            return Err(ApiError::bad_request(
                "invalid_field",
                "threshold: must be a finite number",
            ));
        }
        if let Some(clear) = self.clear_threshold {
            let sensible = match self.op {
                Op::Gt | Op::Gte => clear <= self.threshold,
                Op::Lt | Op::Lte => clear >= self.threshold,
                Op::Eq | Op::Ne => false,
            };
            if !clear.is_finite() || !sensible {
                return Err(ApiError::unprocessable(
                    "invalid_clear_threshold",
                    format!(
                        "clear_threshold: must be a finite number on the safe side of the threshold \
                         (at most it for gt/gte, at least it for lt/lte; none for eq/ne), got {clear}"
                    ),
                ));
            }
        }
        let for_s = self.for_s.unwrap_or(0);
        if !(0..=MAX_FOR_S).contains(&for_s) {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("for_s: between 0 and {MAX_FOR_S}"),
            ));
        }
        Ok(NewRule {
            name: name.into_string(),
            device_id: self.device_id,
            group: self.group,
            metric: self.metric,
            op: self.op,
            threshold: self.threshold,
            clear_threshold: self.clear_threshold,
            for_s,
            severity: self.severity.unwrap_or(Severity::Warning),
            enabled: self.enabled.unwrap_or(true),
        })
    }
}

/// A rule as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RuleOut {
    pub id: String,
    pub name: String,
    pub device_id: Option<String>,
    pub group: Option<String>,
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
    pub clear_threshold: Option<f64>,
    pub for_s: i32,
    pub severity: Severity,
    pub enabled: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl RuleOut {
    /// The writable part, for merging a PATCH into.
    pub fn to_input(&self) -> RuleIn {
        RuleIn {
            name: self.name.clone(),
            device_id: self.device_id.clone(),
            group: self.group.clone(),
            metric: self.metric.clone(),
            op: self.op,
            threshold: self.threshold,
            clear_threshold: self.clear_threshold,
            for_s: Some(self.for_s),
            severity: Some(self.severity),
            enabled: Some(self.enabled),
        }
    }
}

/// What the evaluator needs of a rule.
#[derive(Debug, Clone)]
pub struct Condition {
    pub op: Op,
    pub threshold: f64,
    pub clear_threshold: Option<f64>,
    pub for_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not breaching.
    Ok,
    /// Breaching since `pending_since_us`, for less than `for_s` so far.
    Pending,
    Firing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Ok => "ok",
            Phase::Pending => "pending",
            Phase::Firing => "firing",
        }
    }

    pub fn from_db(value: &str) -> Self {
        match value {
            "pending" => Phase::Pending,
            "firing" => Phase::Firing,
            _ => Phase::Ok,
        }
    }
}

/// Where a rule stands for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertState {
    pub phase: Phase,
    pub pending_since_us: Option<i64>,
    /// The newest reading evaluated; older ones are skipped.
    pub last_ts_us: i64,
    pub last_value: Option<f64>,
}

impl AlertState {
    pub fn new() -> Self {
        Self {
            phase: Phase::Ok,
            pending_since_us: None,
            last_ts_us: i64::MIN,
            last_value: None,
        }
    }
}

impl Default for AlertState {
    fn default() -> Self {
        Self::new()
    }
}

/// A change worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Firing,
    Resolved,
}

impl Condition {
    /// Feeds one reading (in time order) through the state machine. Firing needs the breach
    /// to hold for `for_us` (measured in reading time); resolving needs the value back past
    /// `clear_threshold` (the threshold itself when there is none), so a value hovering at
    /// the threshold does not flap.
    pub fn step(&self, state: &mut AlertState, ts_us: i64, value: f64) -> Option<Transition> {
        if ts_us <= state.last_ts_us || !value.is_finite() {
            return None;
        }
        state.last_ts_us = ts_us;
        state.last_value = Some(value);
        let breaching = self.op.holds(value, self.threshold);
        match state.phase {
            Phase::Firing => {
                let still = self
                    .op
                    .holds(value, self.clear_threshold.unwrap_or(self.threshold));
                if still {
                    None
                } else {
                    state.phase = Phase::Ok;
                    state.pending_since_us = None;
                    Some(Transition::Resolved)
                }
            }
            Phase::Ok | Phase::Pending if !breaching => {
                state.phase = Phase::Ok;
                state.pending_since_us = None;
                None
            }
            Phase::Ok | Phase::Pending => {
                let since = *state.pending_since_us.get_or_insert(ts_us);
                if ts_us - since >= self.for_us {
                    state.phase = Phase::Firing;
                    Some(Transition::Firing)
                } else {
                    state.phase = Phase::Pending;
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(condition: &Condition, readings: &[(i64, f64)]) -> Vec<(i64, Transition)> {
        let mut state = AlertState::new();
        readings
            .iter()
            .filter_map(|(ts, value)| {
                condition
                    .step(&mut state, *ts, *value)
                    .map(|transition| (*ts, transition))
            })
            .collect()
    }

    #[test]
    fn fires_once_stays_quiet_and_resolves_once() {
        let condition = Condition {
            op: Op::Gt,
            threshold: 30.0,
            clear_threshold: None,
            for_us: 0,
        };
        let transitions = run(
            &condition,
            &[
                (1, 20.0),
                (2, 31.0),
                (3, 35.0),
                (4, 32.0),
                (5, 29.0),
                (6, 28.0),
            ],
        );
        assert_eq!(
            transitions,
            vec![(2, Transition::Firing), (5, Transition::Resolved)]
        );
    }

    #[test]
    fn clear_threshold_holds_the_alert_until_the_value_is_well_back() {
        let condition = Condition {
            op: Op::Gt,
            threshold: 30.0,
            clear_threshold: Some(25.0),
            for_us: 0,
        };
        let transitions = run(
            &condition,
            &[(1, 31.0), (2, 29.0), (3, 31.0), (4, 26.0), (5, 25.0)],
        );
        assert_eq!(
            transitions,
            vec![(1, Transition::Firing), (5, Transition::Resolved)]
        );
    }

    #[test]
    fn for_s_needs_the_breach_to_last() {
        let condition = Condition {
            op: Op::Lt,
            threshold: 10.0,
            clear_threshold: None,
            for_us: 10,
        };
        // A short dip (1..5) resets; the long one fires at 30, 10 after it began at 20.
        let transitions = run(
            &condition,
            &[
                (1, 5.0),
                (5, 12.0),
                (20, 5.0),
                (25, 4.0),
                (30, 6.0),
                (31, 3.0),
            ],
        );
        assert_eq!(transitions, vec![(30, Transition::Firing)]);
    }

    #[test]
    fn old_and_repeated_readings_are_skipped() {
        let condition = Condition {
            op: Op::Gte,
            threshold: 1.0,
            clear_threshold: None,
            for_us: 0,
        };
        let transitions = run(&condition, &[(10, 2.0), (5, 0.0), (10, 0.0), (11, 2.0)]);
        assert_eq!(transitions, vec![(10, Transition::Firing)]);
    }

    fn rule(json: serde_json::Value) -> Result<NewRule, ApiError> {
        serde_json::from_value::<RuleIn>(json).unwrap().parse()
    }

    #[test]
    fn rules_are_checked_with_the_field_named() {
        let base = serde_json::json!({"name": "hot", "device_id": "d1", "metric": "t", "op": "gt", "threshold": 30});
        assert!(rule(base.clone()).is_ok());
        let mut both = base.clone();
        both["group"] = "g".into();
        assert_eq!(rule(both).unwrap_err().reason, "invalid_rule_target");
        let mut wrong_side = base.clone();
        wrong_side["clear_threshold"] = 35.into();
        assert_eq!(
            rule(wrong_side).unwrap_err().reason,
            "invalid_clear_threshold"
        );
        let mut long = base;
        long["for_s"] = 100_000.into();
        assert!(rule(long).unwrap_err().message.starts_with("for_s:"));
    }
}
