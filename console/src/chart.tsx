import 'uplot/dist/uPlot.min.css';
import uPlot from 'uplot';
import { useEffect, useRef } from 'preact/hooks';

export type Points = [number[], (number | null)[]];

/** A time-series chart (uPlot); dragging across it selects a window to zoom into. */
export function Chart({
  data,
  label,
  span,
  onZoom,
}: {
  data: Points;
  label: string;
  /** The window shown, in ms: [start, end] (end null: now). */
  span: [number, number | null];
  onZoom: (startMs: number, endMs: number) => void;
}) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const zoom = useRef(onZoom);
  zoom.current = onZoom;
  const shown = useRef(span);
  shown.current = span;

  useEffect(() => {
    const element = box.current!;
    const style = getComputedStyle(document.documentElement);
    const stroke = style.getPropertyValue('--accent').trim() || '#2b7bd6';
    const axis = style.getPropertyValue('--muted').trim() || '#888';
    const grid = style.getPropertyValue('--line').trim() || '#ddd';
    const options: uPlot.Options = {
      width: element.clientWidth || 600,
      height: 260,
      scales: {
        x: {
          time: true,
          range: () => [shown.current[0] / 1000, (shown.current[1] ?? Date.now()) / 1000],
        },
      },
      series: [{}, { label, stroke, width: 1.5, points: { show: data[0].length < 120 } }],
      axes: [
        { stroke: axis, grid: { stroke: grid } },
        { stroke: axis, grid: { stroke: grid } },
      ],
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 5) return;
            const from = u.posToVal(u.select.left, 'x');
            const to = u.posToVal(u.select.left + u.select.width, 'x');
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            zoom.current(from * 1000, to * 1000);
          },
        ],
      },
    };
    plot.current = new uPlot(options, data as uPlot.AlignedData, element);
    const resize = new ResizeObserver(() => plot.current?.setSize({ width: element.clientWidth, height: 260 }));
    resize.observe(element);
    return () => {
      resize.disconnect();
      plot.current?.destroy();
      plot.current = null;
    };
  }, [label]);

  useEffect(() => {
    plot.current?.setData(data as uPlot.AlignedData);
  }, [data, span[0], span[1]]);

  return <div class="chart" ref={box} data-testid="chart" data-metric={label} data-points={data[0].length} />;
}
