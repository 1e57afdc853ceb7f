import { useState } from 'preact/hooks';

import { all, api, type Alert, type Rule } from '../api';
import { ago, Card, ErrorLine, Status, useAction, useData } from '../ui';

export function AlertsPage() {
  const firing = useData(() => all<Alert>('/api/v1/alerts'), [], 5000);
  const rules = useData(() => all<Rule>('/api/v1/alert-rules'), []);
  const [form, setForm] = useState({ name: '', target: '', metric: '', op: 'gt', threshold: '', for_s: '0', severity: 'warning' });
  const action = useAction();
  const set = (field: string) => (e: Event) => setForm({ ...form, [field]: (e.target as HTMLInputElement).value });
  const create = (event: Event) => {
    event.preventDefault();
    void action.run(async () => {
      const [kind, value] = form.target.includes(':') ? form.target.split(':', 2) : ['device', form.target];
      await api.post('/api/v1/alert-rules', {
        name: form.name.trim(),
        [kind === 'group' ? 'group' : 'device_id']: value.trim(),
        metric: form.metric.trim(),
        op: form.op,
        threshold: Number(form.threshold),
        for_s: Number(form.for_s) || 0,
        severity: form.severity,
      });
      rules.reload();
    });
  };
  const toggle = (rule: Rule) => action.run(async () => {
    await api.patch(`/api/v1/alert-rules/${rule.id}`, { enabled: !rule.enabled });
    rules.reload();
  });
  const remove = (rule: Rule) => action.run(async () => {
    await api.del(`/api/v1/alert-rules/${rule.id}`);
    rules.reload();
  });
  return (
    <div class="page">
      <h1>Alerts</h1>
      <Card title="Firing now">
        <ErrorLine error={firing.error} />
        {firing.data && firing.data.length === 0 && <p class="muted">Nothing is firing.</p>}
        <div class="scroll">
          <table data-testid="firing-table">
            <tbody>
              {(firing.data ?? []).map((a) => (
                <tr>
                  <td>
                    <Status value={a.severity} />
                  </td>
                  <td>{a.rule_name}</td>
                  <td>
                    <a href={`#/devices/${encodeURIComponent(a.device_id)}`}>{a.device_id}</a>
                  </td>
                  <td>
                    {a.metric} = {a.value ?? '—'} ({a.op} {a.threshold})
                  </td>
                  <td>since {ago(a.since)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </Card>
      <Card title="Rules">
        <form class="inline" onSubmit={create}>
          <input placeholder="name" value={form.name} onInput={set('name')} required />
          <input placeholder="device id, or group:name" value={form.target} onInput={set('target')} required />
          <input placeholder="metric" value={form.metric} onInput={set('metric')} required />
          <select value={form.op} onChange={set('op')} aria-label="operator">
            {['gt', 'gte', 'lt', 'lte', 'eq', 'ne'].map((op) => (
              <option value={op}>{op}</option>
            ))}
          </select>
          <input placeholder="threshold" inputMode="decimal" value={form.threshold} onInput={set('threshold')} required />
          <input placeholder="for (s)" inputMode="numeric" value={form.for_s} onInput={set('for_s')} />
          <select value={form.severity} onChange={set('severity')} aria-label="severity">
            {['info', 'warning', 'critical'].map((s) => (
              <option value={s}>{s}</option>
            ))}
          </select>
          <button type="submit" class="primary" disabled={action.busy}>
            Add rule
          </button>
        </form>
        <ErrorLine error={action.error ?? rules.error} />
        <div class="scroll">
          <table>
            <tbody>
              {(rules.data ?? []).map((r) => (
                <tr>
                  <td>
                    <Status value={r.severity} />
                  </td>
                  <td>{r.name}</td>
                  <td>{r.device_id ?? `group ${r.group}`}</td>
                  <td>
                    {r.metric} {r.op} {r.threshold}
                    {r.for_s ? ` for ${r.for_s}s` : ''}
                  </td>
                  <td>
                    <button type="button" onClick={() => toggle(r)}>
                      {r.enabled ? 'Disable' : 'Enable'}
                    </button>{' '}
                    <button type="button" class="danger" onClick={() => remove(r)}>
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </Card>
    </div>
  );
}
