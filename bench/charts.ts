// SVG charts of a suite run, rendered server-side by Apache ECharts (no browser, no DOM): one grouped bar chart
// per kind of figure, the rows along one axis and one bar per system. Pure apart from the library: it takes
// summaries and returns SVG text; bench/suite.ts writes the files.
import * as echarts from 'echarts';
import type { RowSummary, SystemInfo } from './report.ts';

export interface Chart {
  /** File name, without directory. */
  file: string;
  title: string;
  svg: string;
}

const width = 960;
const barHeight = 11;

// A palette with the raw disk in grey, peers in blues and greens, chunkd in oranges and reds, so that the
// systems read alike in every chart.
const colours: Record<SystemInfo['kind'], string[]> = {
  raw: ['#8c8c8c'],
  peer: ['#4e79a7', '#76b7b2', '#59a14f', '#9c755f', '#b07aa1'],
  chunkd: ['#e15759', '#f28e2b', '#edc948', '#ff9da7', '#d37295', '#bab0ac'],
};

function colourOf(systems: readonly SystemInfo[], system: SystemInfo): string {
  const sameKind = systems.filter((entry) => entry.kind === system.kind);
  const palette = colours[system.kind];
  return palette[sameKind.indexOf(system) % palette.length]!;
}

/** A horizontal grouped bar chart: one group per row, one bar per system; null values leave a gap. */
function barChart(title: string, axisName: string, rows: readonly RowSummary[], systems: readonly SystemInfo[], value: (row: RowSummary, system: SystemInfo) => number | null, options: { log?: boolean; markLine?: number; subtitle?: string } = {}): string {
  const height = Math.max(240, 90 + rows.length * (systems.length * barHeight + 18));
  const chart = echarts.init(null, null, { renderer: 'svg', ssr: true, width, height });
  const categories = rows.map((row) => row.title);
  chart.setOption({
    animation: false,
    backgroundColor: '#ffffff',
    title: { text: title, subtext: options.subtitle ?? '', left: 'center', textStyle: { fontSize: 15 }, subtextStyle: { fontSize: 11 } },
    legend: { top: options.subtitle === undefined ? 34 : 50, type: 'plain' },
    grid: { left: 220, right: 40, top: (options.subtitle === undefined ? 76 : 92) + Math.ceil(systems.length / 5) * 18, bottom: 40 },
    xAxis: { type: options.log ? 'log' : 'value', name: axisName, nameLocation: 'middle', nameGap: 26, splitLine: { show: true } },
    // Rows read top to bottom in the order of the tables.
    yAxis: { type: 'category', data: categories, inverse: true, axisLabel: { fontSize: 11 } },
    series: systems.map((system, index) => ({
      name: system.id,
      type: 'bar',
      barMaxWidth: barHeight,
      itemStyle: { color: colourOf(systems, system) },
      data: rows.map((row) => {
        const figure = value(row, system);
        return figure === null || !(figure > 0) ? null : Number(figure.toPrecision(4));
      }),
      ...(index === 0 && options.markLine !== undefined
        ? { markLine: { symbol: 'none', silent: true, label: { formatter: `${options.markLine}x` }, lineStyle: { type: 'dashed', color: '#333' }, data: [{ xAxis: options.markLine }] } }
        : {}),
    })),
  });
  const svg = chart.renderToSVGString();
  chart.dispose();
  return svg;
}

/** Whether the plotted values span more than 20x: a linear axis would flatten the small ones. */
function wideSpread(rows: readonly RowSummary[], systems: readonly SystemInfo[], value: (row: RowSummary, system: SystemInfo) => number | null): boolean {
  const values = rows.flatMap((row) => systems.map((system) => value(row, system))).filter((entry): entry is number => entry !== null && entry > 0);
  return values.length > 0 && Math.max(...values) / Math.min(...values) > 20;
}

/** The charts of one run: IOPS rows, MB/s rows, p99 latency of the IOPS rows, and chunkd's ratios to the best peer. */
export function renderCharts(summaries: readonly RowSummary[], systems: readonly SystemInfo[], label: string): Chart[] {
  const measured = systems.filter((system) => system.skipped === null);
  const iopsRows = summaries.filter((row) => row.metric === 'iops');
  const mbpsRows = summaries.filter((row) => row.metric === 'mbps');
  const median = (row: RowSummary, system: SystemInfo): number | null => row.systems[system.id]?.value?.median ?? null;
  const charts: Chart[] = [];
  // The raw file system from a warm page cache runs at memory speed, often ten times any server: drawn on the same
  // linear axis it would flatten every other bar, so it is left out of a throughput chart where it is off scale.
  const onScale = (rows: readonly RowSummary[]): { systems: SystemInfo[]; subtitle?: string } => {
    const raw = measured.find((system) => system.kind === 'raw');
    if (raw === undefined) return { systems: measured };
    const offScale = rows.some((row) => {
      const rawMedian = median(row, raw);
      const best = Math.max(0, ...measured.filter((system) => system !== raw).map((system) => median(row, system) ?? 0));
      return rawMedian !== null && best > 0 && rawMedian > 3 * best;
    });
    return offScale ? { systems: measured.filter((system) => system !== raw), subtitle: 'raw file system left out: more than 3x every server here (page cache); see the tables' } : { systems: measured };
  };
  if (iopsRows.length > 0) {
    const scale = onScale(iopsRows);
    const log = wideSpread(iopsRows, scale.systems, median);
    charts.push({
      file: 'iops.svg',
      title: `4 KiB random I/O, IOPS (${label})`,
      svg: barChart(`4 KiB random I/O: IOPS, median${log ? ', log scale' : ''} (${label})`, 'IOPS', iopsRows, scale.systems, median, { log, ...(scale.subtitle === undefined ? {} : { subtitle: scale.subtitle }) }),
    });
    charts.push({
      file: 'latency-p99.svg',
      title: `4 KiB random I/O, p99 latency (${label})`,
      svg: barChart(`4 KiB random I/O: p99 completion latency, µs, log scale (${label})`, 'µs', iopsRows, measured, (row, system) => row.systems[system.id]?.latencyUsP99 ?? null, { log: true }),
    });
  }
  if (mbpsRows.length > 0) {
    const scale = onScale(mbpsRows);
    charts.push({ file: 'throughput.svg', title: `1 MiB sequential I/O, MB/s (${label})`, svg: barChart(`1 MiB sequential I/O: MB/s, median (${label})`, 'MB/s', mbpsRows, scale.systems, median, scale.subtitle === undefined ? {} : { subtitle: scale.subtitle }) });
  }
  const ours = measured.filter((system) => system.kind === 'chunkd');
  if (ours.length > 0 && summaries.length > 0) {
    charts.push({
      file: 'ratio-best-peer.svg',
      title: `chunkd / best peer (${label})`,
      // Log scale: 0.5x and 2x lie as far from 1x, and one tenfold outlier does not flatten the rest.
      svg: barChart(`chunkd over the best peer of each row, log scale (${label})`, 'ratio', summaries, ours, (row, system) => row.systems[system.id]?.ratioToBestPeer ?? null, { markLine: 1, log: true }),
    });
  }
  return charts;
}
