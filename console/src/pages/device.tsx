import { useEffect, useRef, useState } from 'preact/hooks';

import { api, type Command, type Device, download, enc, type Reading, type Rule, type Webhook } from '../api';
import { Chart, type Points } from '../chart';
import { subscribe } from '../sse';
import { ago, Card, ErrorLine, Secret, show, Status, time, useAction, useData } from '../ui';

interface Metric {
  metric: string;
  first_ts: string;
  last_ts: string;
  count: number;
}

interface Version {
  version: number;
  config: unknown;
  changed_by: string;
  created_at: string;
}

const RANGES: [string, number][] = [
  ['15m', 15 * 60_000],
  ['1h', 3600_000],
  ['6h', 6 * 3600_000],
  ['24h', 24 * 3600_000],
  ['7d', 7 * 24 * 3600_000],
];

/** Bucket widths, finest first; raw readings up to two hours. */
const INTERVALS: [string, number][] = [
  ['1m', 60_000],
  ['5m', 300_000],
  ['15m', 900_000],
  ['1h', 3600_000],
  ['6h', 6 * 3600_000],
  ['1d', 86400_000],
];

interface Window {
  start: number;
  end: number | null; // null: up to now, and live
}

function resolution(window: Window): string | null {
  const span = (window.end ?? Date.now()) - window.start;
  if (span <= 2 * 3600_000) return null;
  const found = INTERVALS.find(([, ms]) => span / ms <= 500);
  return (found ?? INTERVALS[INTERVALS.length - 1])[0];
}

/** Points with new ones added in time order, one per time (the newer value wins). */
function merge([xs, ys]: Points, added: [number, number][]): Points {
  const byTime = new Map<number, number | null>();
  xs.forEach((x, i) => byTime.set(x, ys[i]));
  for (const [x, y] of added) byTime.set(x, y);
  const times = [...byTime.keys()].sort((a, b) => a - b);
  return [times, times.map((x) => byTime.get(x) ?? null)];
}

async function loadPoints(id: string, metric: string, window: Window): Promise<{ points: Points; source: string }> {
  const start = new Date(window.start).toISOString();
  const end = window.end ? `&end=${enc(new Date(window.end).toISOString())}` : '';
  const interval = resolution(window);
  if (!interval) {
    const rows = await api.get<Reading[]>(`/api/v1/devices/${enc(id)}/readings?metric=${enc(metric)}&start=${enc(start)}${end}&order=asc&limit=10000`);
    const xs: number[] = [];
    const ys: (number | null)[] = [];
    for (const row of rows) {
      xs.push(Date.parse(row.ts) / 1000);
      ys.push(typeof row.value === 'number' ? row.value : typeof row.value === 'boolean' ? Number(row.value) : null);
    }
    return { points: [xs, ys], source: 'raw readings' };
  }
  const result = await api.get<{ sources: string[]; series: { metric: string; buckets: { ts: string; avg: number | null }[] }[] }>(
    `/api/v1/devices/${enc(id)}/readings/aggregate?metric=${enc(metric)}&start=${enc(start)}${end}&interval=${interval}&fn=avg`,
  );
  const buckets = result.series[0]?.buckets ?? [];
  return {
    points: [buckets.map((b) => Date.parse(b.ts) / 1000), buckets.map((b) => b.avg)],
    source: `average per ${interval} (${result.sources.join(', ')})`,
  };
}

function History({
  id,
  metrics,
  live,
  epoch,
}: {
  id: string;
  metrics: string[];
  live: { subscribeTo: (fn: (r: Reading[]) => void) => () => void };
  /** Bumped when the stream could not resume without a gap: load history again. */
  epoch: number;
}) {
  const [metric, setMetric] = useState(metrics[0]);
  const [range, setRange] = useState('1h');
  const [window, setWindow] = useState<Window>({ start: Date.now() - 3600_000, end: null });
  const [points, setPoints] = useState<Points>([[], []]);
  const [source, setSource] = useState('');
  const [error, setError] = useState<string | null>(null);
  const windowRef = useRef(window);
  windowRef.current = window;
  // Live readings that came while the history was loading: the answer may predate them.
  const arrived = useRef<[number, number][]>([]);

  useEffect(() => {
    if (!metrics.includes(metric)) setMetric(metrics[0]);
  }, [metrics.join(',')]);

  useEffect(() => {
    let cancelled = false;
    setError(null);
    arrived.current = [];
    loadPoints(id, metric, window)
      .then((result) => {
        if (cancelled) return;
        setPoints(resolution(window) === null ? merge(result.points, arrived.current) : result.points);
        setSource(`${result.source} of ${metric}`);
      })
      .catch((e: Error) => setError(e.message));
    return () => {
      cancelled = true;
    };
  }, [id, metric, window, epoch]);

  // New readings of this metric join a live raw chart at once.
  useEffect(
    () =>
      live.subscribeTo((readings) => {
        const current = windowRef.current;
        if (current.end !== null || resolution(current) !== null) return;
        const fresh: [number, number][] = readings
          .filter((r) => r.metric === metric && typeof r.value === 'number' && Date.parse(r.ts) >= current.start)
          .map((r) => [Date.parse(r.ts) / 1000, r.value as number]);
        if (fresh.length === 0) return;
        arrived.current.push(...fresh);
        setPoints((old) => merge(old, fresh));
      }),
    [metric],
  );

  const pick = (name: string, ms: number) => {
    setRange(name);
    setWindow({ start: Date.now() - ms, end: null });
  };
  const csv = () => {
    const end = window.end ? `&end=${enc(new Date(window.end).toISOString())}` : '';
    void download(`/api/v1/devices/${enc(id)}/readings?start=${enc(new Date(window.start).toISOString())}${end}&format=csv`, 'text/csv', `${id}.csv`).catch((e) =>
      setError(e.message),
    );
  };

  return (
    <Card
      title="History"
      actions={
        <>
          <select aria-label="metric" value={metric} onChange={(e) => setMetric((e.target as HTMLSelectElement).value)}>
            {metrics.map((m) => (
              <option value={m}>{m}</option>
            ))}
          </select>
          <button type="button" onClick={csv}>
            CSV
          </button>
        </>
      }
    >
      <div class="ranges">
        {RANGES.map(([name, ms]) => (
          <button type="button" class={range === name && window.end === null ? 'on' : ''} onClick={() => pick(name, ms)}>
            {name}
          </button>
        ))}
        {window.end !== null && (
          <button type="button" onClick={() => pick(range, RANGES.find(([n]) => n === range)![1])}>
            Reset zoom
          </button>
        )}
      </div>
      <ErrorLine error={error} />
      <Chart data={points} label={metric} span={[window.start, window.end]} onZoom={(start, end) => setWindow({ start, end })} />
      <p class="muted small" data-testid="chart-source">
        {source}
        {window.end === null && resolution(window) === null ? ' · live' : ''} · {points[0].length} points · drag across the chart to zoom in
      </p>
    </Card>
  );
}

function ConfigEditor({ id }: { id: string }) {
  const config = useData(() => api.get<{ version: number; config: unknown }>(`/api/v1/devices/${enc(id)}/config`), [id]);
  const versions = useData(() => api.get<Version[]>(`/api/v1/devices/${enc(id)}/config/versions`), [id]);
  const [text, setText] = useState('');
  const action = useAction();
  useEffect(() => {
    if (config.data) setText(JSON.stringify(config.data.config, null, 2));
  }, [config.data?.version]);
  const save = () =>
    action.run(async () => {
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch (e) {
        throw new Error(`not JSON: ${(e as Error).message}`);
      }
      await api.put(`/api/v1/devices/${enc(id)}/config`, parsed);
      config.reload();
      versions.reload();
    });
  return (
    <Card title={`Config${config.data ? ` · version ${config.data.version}` : ''}`}>
      <textarea class="code" rows={8} value={text} onInput={(e) => setText((e.target as HTMLTextAreaElement).value)} aria-label="config" />
      <div class="actions">
        <button type="button" class="primary" onClick={save} disabled={action.busy}>
          Save as a new version
        </button>
      </div>
      <ErrorLine error={action.error ?? config.error} />
      <details>
        <summary>Version history ({versions.data?.length ?? 0})</summary>
        <ul class="plain">
          {(versions.data ?? []).map((v) => (
            <li>
              <button type="button" class="link" onClick={() => setText(JSON.stringify(v.config, null, 2))}>
                v{v.version}
              </button>{' '}
              {time(v.created_at)} by {v.changed_by}
            </li>
          ))}
        </ul>
      </details>
    </Card>
  );
}

function Commands({ id }: { id: string }) {
  const commands = useData(() => api.get<Command[]>(`/api/v1/devices/${enc(id)}/commands?limit=20`), [id], 5000);
  const [name, setName] = useState('');
  const [params, setParams] = useState('{}');
  const action = useAction();
  const send = (event: Event) => {
    event.preventDefault();
    void action.run(async () => {
      await api.post(`/api/v1/devices/${enc(id)}/commands`, { name: name.trim(), params: JSON.parse(params || '{}'), ttl_s: 300 });
      setName('');
      commands.reload();
    });
  };
  return (
    <Card title="Commands">
      <form class="inline" onSubmit={send}>
        <input placeholder="name (e.g. reboot)" value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} required />
        <input placeholder='params {"percent": 40}' value={params} onInput={(e) => setParams((e.target as HTMLInputElement).value)} />
        <button type="submit" disabled={action.busy}>
          Send
        </button>
      </form>
      <ErrorLine error={action.error ?? commands.error} />
      <div class="scroll">
        <table>
          <tbody>
            {(commands.data ?? []).map((c) => (
              <tr>
                <td>{c.name}</td>
                <td>
                  <Status value={c.status} />
                </td>
                <td>{ago(c.created_at)}</td>
                <td class="wide">{c.detail ?? ''}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </Card>
  );
}

export function DevicePage({ id }: { id: string }) {
  const device = useData(() => api.get<Device>(`/api/v1/devices/${enc(id)}`), [id], 15000);
  const latest = useData(() => api.get<Reading[]>(`/api/v1/devices/${enc(id)}/readings/latest`), [id]);
  const metrics = useData(() => api.get<Metric[]>(`/api/v1/devices/${enc(id)}/metrics`), [id]);
  const webhooks = useData(() => api.get<Webhook[]>(`/api/v1/devices/${enc(id)}/webhooks`), [id]);
  const rules = useData(() => api.get<Rule[]>(`/api/v1/alert-rules?device_id=${enc(id)}`), [id]);
  const [secret, setSecret] = useState<string | null>(null);
  const [liveState, setLiveState] = useState('connecting');
  const [epoch, setEpoch] = useState(0);
  const listeners = useRef(new Set<(r: Reading[]) => void>());
  const action = useAction();

  useEffect(() => {
    const stream = subscribe(
      `/api/v1/devices/${enc(id)}/readings/stream`,
      (event) => {
        if (event.event === 'reset') {
          setEpoch((n) => n + 1);
          latest.reload();
          return;
        }
        if (event.event !== 'readings') return;
        const readings = event.data.readings as Reading[];
        listeners.current.forEach((fn) => fn(readings));
        latest.setData((old) => {
          const byMetric = new Map((old ?? []).map((r) => [r.metric, r]));
          for (const r of readings) {
            const known = byMetric.get(r.metric);
            if (!known || Date.parse(known.ts) <= Date.parse(r.ts)) byMetric.set(r.metric, r);
          }
          return [...byMetric.values()].sort((a, b) => a.metric.localeCompare(b.metric));
        });
        if (readings.some((r) => !(metrics.data ?? []).some((m) => m.metric === r.metric))) metrics.reload();
      },
      setLiveState,
    );
    return () => stream.close();
  }, [id]);

  // A reading is stored a moment after it is acknowledged (the writer gathers small batches
  // for up to FIELDLINE_WRITER_LINGER), so a device's first metric can be missing from a page
  // opened just after it was sent: until the device has one, the list is asked for again.
  const hasMetrics = (metrics.data ?? []).length > 0;
  useEffect(() => {
    if (hasMetrics) return;
    const timer = setInterval(metrics.reload, 2000);
    return () => clearInterval(timer);
  }, [id, hasMetrics]);

  const live = {
    subscribeTo: (fn: (r: Reading[]) => void) => {
      listeners.current.add(fn);
      return () => listeners.current.delete(fn);
    },
  };
  const numeric = (metrics.data ?? []).map((m) => m.metric);
  const rotate = () =>
    action.run(async () => {
      const rotated = await api.post<{ token: string }>(`/api/v1/devices/${enc(id)}/token`);
      setSecret(rotated.token);
    });
  const remove = () => {
    if (!confirm(`Delete ${id}? Its token stops working at once.`)) return;
    void action.run(async () => {
      await api.del(`/api/v1/devices/${enc(id)}`);
      location.hash = '#/devices';
    });
  };
  const d = device.data;
  return (
    <div class="page">
      <h1>
        <a href="#/devices">Devices</a> / {id} {d && <Status value={d.status} />}
      </h1>
      <ErrorLine error={device.error ?? action.error} />
      {secret && <Secret label={`New token of ${id}`} value={secret} onClose={() => setSecret(null)} />}
      {d && (
        <Card
          actions={
            <>
              <button type="button" onClick={rotate}>
                Rotate token
              </button>
              <button type="button" class="danger" onClick={remove}>
                Delete
              </button>
            </>
          }
        >
          <dl class="facts">
            <dt>type</dt>
            <dd>{d.type}</dd>
            <dt>group</dt>
            <dd>{d.group ?? '—'}</dd>
            <dt>tags</dt>
            <dd>{d.tags.join(', ') || '—'}</dd>
            <dt>last seen</dt>
            <dd>{ago(d.last_seen)}</dd>
            <dt>live</dt>
            <dd data-testid="live-state">{liveState}</dd>
          </dl>
        </Card>
      )}
      <Card title="Latest values">
        <div class="values" data-testid="latest">
          {(latest.data ?? []).map((r) => (
            <div class="value">
              <span class="muted">{r.metric}</span>
              <strong>{show(r.value)}</strong>
              <span class="muted small">{ago(r.ts)}</span>
            </div>
          ))}
          {latest.data && latest.data.length === 0 && <p class="muted">No reading yet.</p>}
        </div>
      </Card>
      {numeric.length > 0 ? <History id={id} metrics={numeric} live={live} epoch={epoch} /> : <Card title="History"><p class="muted">No metric yet: the chart appears with the first reading.</p></Card>}
      <div class="grid2">
        <ConfigEditor id={id} />
        <Commands id={id} />
      </div>
      <div class="grid2">
        <Card title="Webhooks of this device">
          <ul class="plain">
            {(webhooks.data ?? []).map((w) => (
              <li>
                <a href={`#/webhooks/${w.id}`}>{w.name ?? w.url}</a> {w.enabled ? '' : <Status value="disabled" />}
              </li>
            ))}
          </ul>
          {webhooks.data && webhooks.data.length === 0 && <p class="muted">None scoped to this device.</p>}
        </Card>
        <Card title="Alert rules">
          <ul class="plain">
            {(rules.data ?? []).map((r) => (
              <li>
                <Status value={r.severity} /> {r.name}: {r.metric} {r.op} {r.threshold}
                {r.for_s ? ` for ${r.for_s}s` : ''}
              </li>
            ))}
          </ul>
          {rules.data && rules.data.length === 0 && <p class="muted">No rule watches this device.</p>}
        </Card>
      </div>
    </div>
  );
}
