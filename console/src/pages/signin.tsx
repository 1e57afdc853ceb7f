import { useState } from 'preact/hooks';

import { api, signIn } from '../api';
import { ErrorLine } from '../ui';

export function SignIn({ onSignedIn }: { onSignedIn: () => void }) {
  const [key, setKey] = useState('');
  const [error, setError] = useState<string | null>(null);
  const submit = async (event: Event) => {
    event.preventDefault();
    setError(null);
    try {
      const who = await api.whoami(key.trim());
      signIn(key.trim());
      sessionStorage.setItem('fieldline.project', who.project);
      onSignedIn();
    } catch (e) {
      setError((e as Error).message);
    }
  };
  return (
    <form class="signin card" onSubmit={submit}>
      <h1>Fieldline</h1>
      <p>Sign in with an API key of your project. It is kept in this tab only, until you close it.</p>
      <label>
        API key
        <input name="key" type="password" autocomplete="off" placeholder="flk_…" value={key} onInput={(e) => setKey((e.target as HTMLInputElement).value)} required />
      </label>
      <button type="submit" class="primary">
        Sign in
      </button>
      <ErrorLine error={error} />
    </form>
  );
}
