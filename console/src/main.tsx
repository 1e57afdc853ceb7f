import './style.css';
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';

import { apiKey, signOut } from './api';
import { AlertsPage } from './pages/alerts';
import { DevicePage } from './pages/device';
import { DevicesPage } from './pages/devices';
import { KeysPage } from './pages/keys';
import { OverviewPage } from './pages/overview';
import { SignIn } from './pages/signin';
import { WebhookPage, WebhooksPage } from './pages/webhooks';

type Theme = 'light' | 'dark';

function initialTheme(): Theme {
  const saved = localStorage.getItem('fieldline.theme');
  if (saved === 'light' || saved === 'dark') return saved;
  return matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
}

function useHash(): string {
  const [hash, setHash] = useState(location.hash || '#/');
  useEffect(() => {
    const onChange = () => setHash(location.hash || '#/');
    addEventListener('hashchange', onChange);
    return () => removeEventListener('hashchange', onChange);
  }, []);
  return hash;
}

const NAV: [string, string][] = [
  ['#/', 'Overview'],
  ['#/devices', 'Devices'],
  ['#/alerts', 'Alerts'],
  ['#/webhooks', 'Webhooks'],
  ['#/keys', 'Keys'],
];

function Page({ hash }: { hash: string }) {
  const parts = hash.replace(/^#\/?/, '').split('?')[0].split('/').map(decodeURIComponent);
  switch (parts[0]) {
    case 'devices':
      return parts[1] ? <DevicePage id={parts[1]} /> : <DevicesPage />;
    case 'alerts':
      return <AlertsPage />;
    case 'webhooks':
      return parts[1] ? <WebhookPage id={parts[1]} /> : <WebhooksPage />;
    case 'keys':
      return <KeysPage />;
    default:
      return <OverviewPage />;
  }
}

function App() {
  const [theme, setTheme] = useState<Theme>(initialTheme);
  const [signedIn, setSignedIn] = useState(apiKey() !== null);
  const hash = useHash();
  useEffect(() => {
    document.documentElement.dataset.theme = theme;
    localStorage.setItem('fieldline.theme', theme);
  }, [theme]);
  const project = sessionStorage.getItem('fieldline.project');
  const toggle = (
    <button type="button" class="theme" aria-label="Switch theme" onClick={() => setTheme(theme === 'dark' ? 'light' : 'dark')}>
      {theme === 'dark' ? '☀ Light' : '☾ Dark'}
    </button>
  );
  if (!signedIn) {
    return (
      <div class="signin-wrap">
        <div class="topright">{toggle}</div>
        <SignIn onSignedIn={() => setSignedIn(true)} />
      </div>
    );
  }
  const section = '#/' + (hash.replace(/^#\/?/, '').split('/')[0] || '');
  return (
    <div class="shell">
      <nav>
        <a class="brand" href="#/">
          Fieldline
        </a>
        <div class="links">
          {NAV.map(([href, label]) => (
            <a href={href} class={section === href ? 'active' : ''}>
              {label}
            </a>
          ))}
        </div>
        <div class="who">
          {project && <span class="project">project {project}</span>}
          {toggle}
          <button type="button" onClick={signOut}>
            Sign out
          </button>
        </div>
      </nav>
      <main>
        <Page hash={hash} />
      </main>
    </div>
  );
}

render(<App />, document.getElementById('app')!);
