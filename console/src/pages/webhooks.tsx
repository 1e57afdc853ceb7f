import { useState } from 'preact/hooks';

import { all, api, type Delivery, enc, type Webhook } from '../api';
import { ago, Card, ErrorLine, Secret, Status, time, useAction, useData } from '../ui';

const EVENTS = ['device.data', 'device.alert', 'device.status', 'config.update'];

export function WebhooksPage() {
  const webhooks = useData(() => all<Webhook>('/api/v1/webhooks'), [], 10000);
  const [form, setForm] = useState({ name: '', url: '', events: new Set(EVENTS) });
  const [secret, setSecret] = useState<string | null>(null);
  const action = useAction();
  const create = (event: Event) => {
    event.preventDefault();
    void action.run(async () => {
      const created = await api.post<Webhook & { secret: string }>('/api/v1/webhooks', {
        name: form.name.trim() || undefined,
        url: form.url.trim(),
        events: [...form.events],
      });
      setSecret(created.secret);
      setForm({ name: '', url: '', events: new Set(EVENTS) });
      webhooks.reload();
    });
  };
  const flip = (name: string) => {
    const events = new Set(form.events);
    if (events.has(name)) events.delete(name);
    else events.add(name);
    setForm({ ...form, events });
  };
  return (
    <div class="page">
      <h1>Webhooks</h1>
      {secret && <Secret label="Signing secret" value={secret} onClose={() => setSecret(null)} />}
      <Card title="New webhook">
        <form class="inline" onSubmit={create} data-testid="new-webhook">
          <input name="name" placeholder="name" value={form.name} onInput={(e) => setForm({ ...form, name: (e.target as HTMLInputElement).value })} />
          <input name="url" placeholder="https://…" value={form.url} onInput={(e) => setForm({ ...form, url: (e.target as HTMLInputElement).value })} required class="grow" />
          {EVENTS.map((name) => (
            <label class="check">
              <input type="checkbox" checked={form.events.has(name)} onChange={() => flip(name)} /> {name}
            </label>
          ))}
          <button type="submit" class="primary" disabled={action.busy}>
            Create
          </button>
        </form>
        <ErrorLine error={action.error} />
      </Card>
      <Card title="Webhooks">
        <ErrorLine error={webhooks.error} />
        <div class="scroll">
          <table>
            <tbody>
              {(webhooks.data ?? []).map((w) => (
                <tr>
                  <td>
                    <a href={`#/webhooks/${w.id}`}>{w.name ?? w.id}</a>
                  </td>
                  <td class="wide url">{w.url}</td>
                  <td>
                    <Status value={w.enabled ? 'enabled' : 'disabled'} />
                  </td>
                  <td class="wide">{w.events.join(', ')}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        {webhooks.data && webhooks.data.length === 0 && <p class="muted">No webhook yet.</p>}
      </Card>
    </div>
  );
}

export function WebhookPage({ id }: { id: string }) {
  const webhook = useData(() => api.get<Webhook>(`/api/v1/webhooks/${enc(id)}`), [id], 3000);
  const deliveries = useData(() => api.get<Delivery[]>(`/api/v1/webhooks/${enc(id)}/deliveries?limit=50`), [id], 2000);
  const [since, setSince] = useState('-24h');
  const [note, setNote] = useState<string | null>(null);
  const action = useAction();
  const act = (label: string, path: string, body?: unknown) =>
    action.run(async () => {
      const result = await api.post<any>(path, body);
      setNote(`${label}: ${JSON.stringify(result ?? {})}`);
      webhook.reload();
      deliveries.reload();
    });
  const w = webhook.data;
  return (
    <div class="page">
      <h1>
        <a href="#/webhooks">Webhooks</a> / {w?.name ?? id} {w && <Status value={w.enabled ? 'enabled' : 'disabled'} />}
      </h1>
      <ErrorLine error={webhook.error ?? action.error} />
      {note && <p class="note">{note}</p>}
      {w && (
        <Card
          actions={
            <>
              <button type="button" onClick={() => act('Test sent', `/api/v1/webhooks/${enc(id)}/test`)}>
                Send test
              </button>
              {!w.enabled && (
                <button type="button" class="primary" onClick={() => act('Enabled', `/api/v1/webhooks/${enc(id)}/enable`)}>
                  Enable
                </button>
              )}
            </>
          }
        >
          <dl class="facts">
            <dt>url</dt>
            <dd class="url">{w.url}</dd>
            <dt>events</dt>
            <dd>{w.events.join(', ')}</dd>
            <dt>state</dt>
            <dd data-testid="webhook-state">{w.enabled ? 'enabled' : `disabled: ${w.disabled_reason ?? ''}`}</dd>
          </dl>
          <form
            class="inline"
            onSubmit={(e) => {
              e.preventDefault();
              void act('Recovered', `/api/v1/webhooks/${enc(id)}/recover`, { since });
            }}
          >
            <label>
              Recover failed deliveries since <input value={since} onInput={(e) => setSince((e.target as HTMLInputElement).value)} size={8} />
            </label>
            <button type="submit">Recover</button>
          </form>
        </Card>
      )}
      <Card title="Delivery log">
        <ErrorLine error={deliveries.error} />
        {deliveries.data && deliveries.data.length === 0 && <p class="muted">No delivery yet.</p>}
        <div class="deliveries" data-testid="deliveries">
          {(deliveries.data ?? []).map((d) => (
            <details class="delivery" data-status={d.status}>
              <summary>
                <Status value={d.status} /> <code>{d.event}</code> {d.device_id ?? ''} · {d.attempts} attempt{d.attempts === 1 ? '' : 's'}
                {d.last_status_code ? ` · HTTP ${d.last_status_code}` : ''} · {ago(d.created_at)}
                {d.status === 'failed' && (
                  <button
                    type="button"
                    class="small"
                    onClick={(e) => {
                      e.preventDefault();
                      void act('Retry queued', `/api/v1/deliveries/${enc(d.id)}/retry`);
                    }}
                  >
                    Retry
                  </button>
                )}
              </summary>
              <table class="attempts">
                <thead>
                  <tr>
                    <th>when</th>
                    <th>status</th>
                    <th>latency</th>
                    <th>response</th>
                  </tr>
                </thead>
                <tbody>
                  {d.attempt_log.map((a) => (
                    <tr>
                      <td>{time(a.attempted_at)}</td>
                      <td>{a.status_code ?? a.error ?? '—'}</td>
                      <td>{a.latency_ms} ms</td>
                      <td>
                        <code class="snippet">{a.response ?? a.error ?? ''}</code>
                      </td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </details>
          ))}
        </div>
      </Card>
    </div>
  );
}
