// The platform's HTTP API, called with the key the operator signed in with. The key lives in
// sessionStorage only: it goes when the tab closes, and never into a URL.

const KEY = 'fieldline.key';

export function apiKey(): string | null {
  return sessionStorage.getItem(KEY);
}

export function signIn(key: string): void {
  sessionStorage.setItem(KEY, key);
}

export function signOut(): void {
  sessionStorage.removeItem(KEY);
  location.hash = '#/';
  location.reload();
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public reason: string,
    message: string,
  ) {
    super(message);
  }
}

export interface Page {
  limit: number;
  next_cursor: string | null;
}

export interface Envelope<T> {
  data: T;
  page?: Page;
}

async function call<T>(method: string, path: string, body?: unknown, key = apiKey()): Promise<Envelope<T>> {
  const headers: Record<string, string> = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return { data: undefined as T };
  let parsed: any = null;
  try {
    parsed = await response.json();
  } catch {
    parsed = null;
  }
  if (!response.ok || parsed?.status !== 'ok') {
    const error = parsed?.error;
    throw new ApiError(response.status, error?.reason ?? 'http_error', error?.message ?? `HTTP ${response.status}`);
  }
  return { data: parsed.data as T, page: parsed.page };
}

export const api = {
  get: <T>(path: string) => call<T>('GET', path).then((e) => e.data),
  page: <T>(path: string) => call<T>('GET', path),
  post: <T>(path: string, body?: unknown) => call<T>('POST', path, body ?? {}).then((e) => e.data),
  put: <T>(path: string, body: unknown) => call<T>('PUT', path, body).then((e) => e.data),
  patch: <T>(path: string, body: unknown) => call<T>('PATCH', path, body).then((e) => e.data),
  del: (path: string) => call<unknown>('DELETE', path).then(() => undefined),
  /** Checks a key before keeping it: any valid key may read its project's limits. */
  whoami: (key: string) => call<{ project: string }>('GET', '/api/v1/limits', undefined, key).then((e) => e.data),
};

/** Every page of a list route (up to `max` rows). */
export async function all<T>(path: string, max = 1000): Promise<T[]> {
  const rows: T[] = [];
  let cursor: string | null = null;
  do {
    const sep = path.includes('?') ? '&' : '?';
    const url: string = cursor ? `${path}${sep}limit=100&cursor=${encodeURIComponent(cursor)}` : `${path}${sep}limit=100`;
    const result: Envelope<T[]> = await call<T[]>('GET', url);
    rows.push(...result.data);
    cursor = result.page?.next_cursor ?? null;
  } while (cursor && rows.length < max);
  return rows;
}

/** Downloads a route's body as a file (the key goes as a header, so no plain link). */
export async function download(path: string, accept: string, filename: string): Promise<void> {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${apiKey()}`, Accept: accept } });
  if (!response.ok) throw new ApiError(response.status, 'download_failed', `HTTP ${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export const enc = encodeURIComponent;

export interface Device {
  id: string;
  name: string | null;
  type: string;
  group: string | null;
  tags: string[];
  status: 'online' | 'offline' | 'unknown';
  last_seen: string | null;
  config_version: number;
  heartbeat_interval_s: number | null;
  created_at: string;
}

export interface Reading {
  metric: string;
  ts: string;
  value: number | boolean | string | null;
}

export interface Alert {
  rule_id: string;
  rule_name: string;
  severity: string;
  device_id: string;
  metric: string;
  op: string;
  threshold: number;
  value: number | null;
  ts: string | null;
  since: string;
}

export interface Rule {
  id: string;
  name: string;
  device_id: string | null;
  group: string | null;
  metric: string;
  op: string;
  threshold: number;
  clear_threshold: number | null;
  for_s: number;
  severity: string;
  enabled: boolean;
}

export interface Webhook {
  id: string;
  name: string | null;
  url: string;
  events: string[];
  device_ids: string[];
  group: string | null;
  enabled: boolean;
  disabled_reason: string | null;
  created_at: string;
}

export interface Attempt {
  attempted_at: string;
  status_code: number | null;
  latency_ms: number;
  error: string | null;
  response: string | null;
}

export interface Delivery {
  id: string;
  event_id: string;
  event: string;
  status: string;
  attempts: number;
  next_attempt_at: string | null;
  last_status_code: number | null;
  last_error: string | null;
  created_at: string;
  completed_at: string | null;
  device_id?: string;
  attempt_log: Attempt[];
}

export interface Key {
  id: string;
  name: string;
  prefix: string;
  scopes: string[];
  platform_admin: boolean;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
}

export interface Command {
  id: string;
  name: string;
  params: unknown;
  status: string;
  created_at: string;
  expires_at: string;
  delivered_at: string | null;
  acked_at: string | null;
  detail: string | null;
}
