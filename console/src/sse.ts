// A Server-Sent Events reader over fetch: EventSource cannot send Authorization, and the key
// must not go in the URL. It reconnects with Last-Event-ID, so nothing is missed between
// connections (the server resumes from that JetStream sequence).

import { apiKey } from './api';

export interface StreamEvent {
  id: string | null;
  event: string;
  data: any;
}

export interface Subscription {
  close(): void;
}

export function subscribe(
  path: string,
  onEvent: (event: StreamEvent) => void,
  onState?: (state: 'open' | 'retrying') => void,
): Subscription {
  const controller = new AbortController();
  let lastId: string | null = null;
  let retryMs = 2000;
  let closed = false;

  const run = async () => {
    while (!closed) {
      try {
        const headers: Record<string, string> = { Authorization: `Bearer ${apiKey()}`, Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const response = await fetch(path, { headers, signal: controller.signal });
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        onState?.('open');
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let id: string | null = null;
            let event = 'message';
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('id: ')) id = line.slice(4);
              else if (line.startsWith('event: ')) event = line.slice(7);
              else if (line.startsWith('data: ')) data += line.slice(6);
              else if (line.startsWith('retry: ')) retryMs = Number(line.slice(7)) || retryMs;
            }
            if (id) lastId = id;
            if (!data) continue;
            try {
              onEvent({ id, event, data: JSON.parse(data) });
            } catch {
              /* a frame that is not JSON is skipped */
            }
          }
        }
      } catch (error) {
        if (closed) return;
      }
      if (closed) return;
      onState?.('retrying');
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  };
  void run();
  return {
    close() {
      closed = true;
      controller.abort();
    },
  };
}
