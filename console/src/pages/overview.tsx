import { useEffect, useState } from 'preact/hooks';

import { all, api, type Alert, type Device, type Webhook } from '../api';
import { subscribe, type StreamEvent } from '../sse';
import { ago, Card, ErrorLine, Status, useData } from '../ui';

interface Activity {
  readings_per_minute: number;
  devices_reporting: number;
}

export function OverviewPage() {
  const devices = useData(() => all<Device>('/api/v1/devices'), [], 15000);
  const alerts = useData(() => api.get<Alert[]>('/api/v1/alerts?limit=100'), [], 15000);
  const webhooks = useData(() => all<Webhook>('/api/v1/webhooks'), [], 15000);
  const activity = useData(() => api.get<Activity>('/api/v1/stats/readings'), [], 10000);
  const [events, setEvents] = useState<StreamEvent[]>([]);
  useEffect(() => {
    const stream = subscribe('/api/v1/events/stream', (event) => {
      setEvents((old) => [event, ...old].slice(0, 20));
      // A status or alert changes the counts: fetch them again now, not at the next tick.
      if (event.event === 'device.status') devices.reload();
      if (event.event === 'device.alert') alerts.reload();
    });
    return () => stream.close();
  }, []);
  const list = devices.data ?? [];
  const online = list.filter((d) => d.status === 'online').length;
  const offline = list.filter((d) => d.status === 'offline').length;
  const failing = (webhooks.data ?? []).filter((w) => !w.enabled);
  return (
    <div class="page">
      <h1>Overview</h1>
      <ErrorLine error={devices.error ?? alerts.error ?? webhooks.error ?? activity.error} />
      <div class="tiles">
        <a class="tile" href="#/devices?status=online" data-testid="tile-online">
          <span class="big">{devices.data ? online : '…'}</span>
          <span>devices online</span>
        </a>
        <a class="tile" href="#/devices?status=offline" data-testid="tile-offline">
          <span class="big">{devices.data ? offline : '…'}</span>
          <span>offline</span>
        </a>
        <div class="tile" data-testid="tile-rate">
          <span class="big">{activity.data ? activity.data.readings_per_minute.toFixed(1) : '…'}</span>
          <span>readings / min (5 min)</span>
        </div>
        <a class={`tile ${(alerts.data?.length ?? 0) > 0 ? 'hot' : ''}`} href="#/alerts" data-testid="tile-alerts">
          <span class="big">{alerts.data ? alerts.data.length : '…'}</span>
          <span>alerts firing</span>
        </a>
        <a class={`tile ${failing.length > 0 ? 'hot' : ''}`} href="#/webhooks" data-testid="tile-webhooks">
          <span class="big">{webhooks.data ? failing.length : '…'}</span>
          <span>webhooks disabled</span>
        </a>
      </div>
      <div class="grid2">
        <Card title="Firing now">
          {alerts.data && alerts.data.length === 0 && <p class="muted">Nothing is firing.</p>}
          <ul class="plain" data-testid="firing">
            {(alerts.data ?? []).map((a) => (
              <li>
                <Status value={a.severity} /> <strong>{a.rule_name}</strong> on <a href={`#/devices/${encodeURIComponent(a.device_id)}`}>{a.device_id}</a>: {a.metric} = {a.value ?? '—'} (
                {a.op} {a.threshold}) since {ago(a.since)}
              </li>
            ))}
          </ul>
        </Card>
        <Card title="Failing webhooks">
          {webhooks.data && failing.length === 0 && <p class="muted">Every webhook is enabled.</p>}
          <ul class="plain">
            {failing.map((w) => (
              <li>
                <a href={`#/webhooks/${w.id}`}>{w.name ?? w.url}</a>: {w.disabled_reason ?? 'disabled'}
              </li>
            ))}
          </ul>
        </Card>
      </div>
      <Card title="Live events">
        {events.length === 0 && <p class="muted">Device status changes and alerts appear here as they happen.</p>}
        <ul class="plain events">
          {events.map((e) => (
            <li>
              <code>{e.event}</code> {e.data.device_id} {e.data.payload?.status ?? e.data.payload?.state ?? ''} <span class="muted">{ago(e.data.occurred_at)}</span>
            </li>
          ))}
        </ul>
      </Card>
    </div>
  );
}
