import { useState } from 'preact/hooks';

import { all, api, type Key } from '../api';
import { ago, Card, ErrorLine, Secret, Status, useAction, useData } from '../ui';

export function KeysPage() {
  const keys = useData(() => all<Key>('/api/v1/keys'), []);
  const [form, setForm] = useState({ name: '', scope: 'read' });
  const [grace, setGrace] = useState('3600');
  const [secret, setSecret] = useState<{ label: string; value: string } | null>(null);
  const action = useAction();
  const create = (event: Event) => {
    event.preventDefault();
    void action.run(async () => {
      const created = await api.post<Key & { secret: string }>('/api/v1/keys', { name: form.name.trim(), scopes: [form.scope] });
      setSecret({ label: `Key ${created.name}`, value: created.secret });
      keys.reload();
    });
  };
  const rotate = (key: Key) =>
    action.run(async () => {
      const rotated = await api.post<{ secret: string }>(`/api/v1/keys/${key.id}/rotate`, { grace_seconds: Number(grace) || 0 });
      setSecret({ label: `New secret of ${key.name} (the old one works for ${Number(grace) || 0} s)`, value: rotated.secret });
      keys.reload();
    });
  const revoke = (key: Key) => {
    if (!confirm(`Revoke ${key.name}? It stops working everywhere at once.`)) return;
    void action.run(async () => {
      await api.del(`/api/v1/keys/${key.id}`);
      keys.reload();
    });
  };
  return (
    <div class="page">
      <h1>API keys</h1>
      {secret && <Secret label={secret.label} value={secret.value} onClose={() => setSecret(null)} />}
      <Card title="New key">
        <form class="inline" onSubmit={create}>
          <input placeholder="name" value={form.name} onInput={(e) => setForm({ ...form, name: (e.target as HTMLInputElement).value })} required />
          <select aria-label="scope" value={form.scope} onChange={(e) => setForm({ ...form, scope: (e.target as HTMLSelectElement).value })}>
            <option value="read">read</option>
            <option value="write">write</option>
            <option value="admin">admin</option>
          </select>
          <button type="submit" class="primary" disabled={action.busy}>
            Create
          </button>
        </form>
        <label class="small">
          Grace on rotate (s) <input aria-label="grace" value={grace} onInput={(e) => setGrace((e.target as HTMLInputElement).value)} size={6} />
        </label>
        <ErrorLine error={action.error ?? keys.error} />
      </Card>
      <Card title="Keys">
        <div class="scroll">
          <table>
            <thead>
              <tr>
                <th>name</th>
                <th>prefix</th>
                <th>scope</th>
                <th class="wide">last used</th>
                <th></th>
              </tr>
            </thead>
            <tbody>
              {(keys.data ?? []).map((k) => (
                <tr data-key={k.name}>
                  <td>{k.name}</td>
                  <td>
                    <code>{k.prefix}…</code>
                  </td>
                  <td>{k.platform_admin ? 'platform admin' : k.scopes.join(', ')}</td>
                  <td class="wide">{ago(k.last_used_at)}</td>
                  <td>
                    {k.revoked_at ? (
                      <Status value="revoked" />
                    ) : (
                      <>
                        <button type="button" onClick={() => rotate(k)}>
                          Rotate
                        </button>{' '}
                        <button type="button" class="danger" onClick={() => revoke(k)}>
                          Revoke
                        </button>
                      </>
                    )}
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
