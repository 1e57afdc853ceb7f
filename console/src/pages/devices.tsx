import { useState } from 'preact/hooks';

import { all, api, type Device } from '../api';
import { ago, Card, ErrorLine, Secret, Status, useAction, useData } from '../ui';

function initialFilter(): { status: string; group: string; tag: string } {
  const query = new URLSearchParams(location.hash.split('?')[1] ?? '');
  return { status: query.get('status') ?? '', group: query.get('group') ?? '', tag: query.get('tag') ?? '' };
}

export function DevicesPage() {
  const [filter, setFilter] = useState(initialFilter);
  const query = new URLSearchParams(Object.entries(filter).filter(([, v]) => v) as [string, string][]).toString();
  const devices = useData(() => all<Device>(`/api/v1/devices${query ? `?${query}` : ''}`), [query], 15000);
  const [creating, setCreating] = useState(false);
  const [form, setForm] = useState({ id: '', type: 'sensor', group: '', tags: '' });
  const [secret, setSecret] = useState<{ label: string; value: string } | null>(null);
  const action = useAction();
  const set = (field: string) => (e: Event) => setForm({ ...form, [field]: (e.target as HTMLInputElement).value });
  const setF = (field: string) => (e: Event) => setFilter({ ...filter, [field]: (e.target as HTMLInputElement).value });

  const create = async (event: Event) => {
    event.preventDefault();
    await action.run(async () => {
      const created = await api.post<Device & { token: string }>('/api/v1/devices', {
        id: form.id.trim(),
        type: form.type.trim() || 'sensor',
        group: form.group.trim() || undefined,
        tags: form.tags
          .split(',')
          .map((t) => t.trim())
          .filter(Boolean),
      });
      setSecret({ label: `Token of ${created.id}`, value: created.token });
      setCreating(false);
      setForm({ id: '', type: 'sensor', group: '', tags: '' });
      devices.reload();
    });
  };

  return (
    <div class="page">
      <h1>Devices</h1>
      {secret && <Secret label={secret.label} value={secret.value} onClose={() => setSecret(null)} />}
      <Card
        actions={
          <button type="button" class="primary" onClick={() => setCreating(!creating)}>
            {creating ? 'Cancel' : 'New device'}
          </button>
        }
      >
        {creating && (
          <form class="inline" onSubmit={create} data-testid="new-device">
            <input name="id" placeholder="id (e.g. greenhouse-1)" value={form.id} onInput={set('id')} required />
            <input name="type" placeholder="type" value={form.type} onInput={set('type')} />
            <input name="group" placeholder="group" value={form.group} onInput={set('group')} />
            <input name="tags" placeholder="tags, comma separated" value={form.tags} onInput={set('tags')} />
            <button type="submit" class="primary" disabled={action.busy}>
              Create
            </button>
          </form>
        )}
        <ErrorLine error={action.error} />
        <div class="filters">
          <select aria-label="status" value={filter.status} onChange={setF('status')}>
            <option value="">any status</option>
            <option value="online">online</option>
            <option value="offline">offline</option>
            <option value="unknown">unknown</option>
          </select>
          <input aria-label="group" placeholder="group" value={filter.group} onChange={setF('group')} />
          <input aria-label="tag" placeholder="tag" value={filter.tag} onChange={setF('tag')} />
        </div>
        <ErrorLine error={devices.error} />
        <div class="scroll">
          <table>
            <thead>
              <tr>
                <th>device</th>
                <th>status</th>
                <th>last seen</th>
                <th class="wide">group</th>
                <th class="wide">tags</th>
              </tr>
            </thead>
            <tbody>
              {(devices.data ?? []).map((d) => (
                <tr>
                  <td>
                    <a href={`#/devices/${encodeURIComponent(d.id)}`}>{d.id}</a>
                  </td>
                  <td>
                    <Status value={d.status} />
                  </td>
                  <td>{ago(d.last_seen)}</td>
                  <td class="wide">{d.group ?? '—'}</td>
                  <td class="wide">{d.tags.join(', ') || '—'}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        {devices.data && devices.data.length === 0 && <p class="muted">No device matches.</p>}
      </Card>
    </div>
  );
}
