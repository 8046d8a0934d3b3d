// The explorer's view: looks precomputed states up and draws them. It computes no statistic:
// every number shown comes from the data block that `bncupy demo` wrote.
"use strict";

const STAGES = [
  {key: "input", title: "Input x"},
  {key: "normalized", title: "Normalized x̂"},
  {key: "output", title: "Output y = γ·x̂ + β"},
];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

// Fixed decimals without a "-0.00" for values that round to zero.
function fmt(value, digits) {
  const s = value.toFixed(digits);
  return /^-0\.?0*$/.test(s) ? s.slice(1) : s;
}

async function decode(meta) {
  const text = document.getElementById("data").textContent.trim();
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const buffer = await new Response(stream).arrayBuffer();
  const types = {f4: Float32Array, i2: Int16Array, u1: Uint8Array};
  const arrays = {};
  for (const [name, spec] of Object.entries(meta.layout)) {
    const size = spec.shape.reduce((a, b) => a * b, 1);
    arrays[name] = {data: new types[spec.type](buffer, spec.offset, size), shape: spec.shape};
  }
  return arrays;
}

class Explorer {
  constructor(meta, arrays) {
    this.meta = meta;
    this.arrays = arrays;
    this.features = meta.defaults.map(([kind, mean, scale, gamma, beta]) =>
      ({kind, mean, scale, gamma, beta}));
    this.mode = "training";
    this.batches = 0;
  }

  // The trailing sub-array of `name` at the leading indices `index`.
  slice(name, index) {
    const a = this.arrays[name];
    let offset = 0;
    let stride = a.data.length;
    index.forEach((i, d) => {
      stride /= a.shape[d];
      offset += i * stride;
    });
    return a.data.subarray(offset, offset + stride);
  }

  column(f) {
    const m = this.meta;
    const s = this.features[f];
    return ((f * m.kinds.length + s.kind) * m.means.length + s.mean) * m.scales.length + s.scale;
  }

  modeIndex() {
    return this.mode === "training" ? 0 : 1 + this.batches;
  }

  // rows, stats [mean, var, std], hist counts and histogram range of one feature at one stage.
  view(stage, f) {
    const c = this.column(f);
    const mode = this.modeIndex();
    const s = this.features[f];
    const index = {
      input: [c],
      normalized: [mode, c],
      output: [mode, s.gamma, s.beta, c],
    }[stage];
    const range = stage === "input" ? this.slice("input_range", [c])
      : this.meta.ranges[stage];
    return {
      rows: this.slice(`${stage}_rows`, index),
      stats: this.slice(`${stage}_stats`, index),
      hist: this.slice(`${stage}_hist`, index),
      range: range,
      clipped: stage !== "input",
    };
  }

  buildControls() {
    const m = this.meta;
    const table = document.querySelector("table.controls");
    const head = table.querySelector("thead tr");
    for (let f = 0; f < m.features; f++) head.append(el("th", {}, `F${f}`));
    const body = table.querySelector("tbody");
    const sliders = [
      ["mean", "input mean", m.means],
      ["scale", "input scale", m.scales],
      ["gamma", "γ", m.gammas],
      ["beta", "β", m.betas],
    ];
    const kindRow = el("tr");
    kindRow.append(el("th", {}, "distribution"));
    for (let f = 0; f < m.features; f++) {
      const select = el("select", {id: `kind-${f}`, "aria-label": `F${f} distribution`});
      m.kinds.forEach((kind, i) => select.append(el("option", {value: String(i)}, kind)));
      select.value = String(this.features[f].kind);
      select.addEventListener("change", () => {
        this.features[f].kind = Number(select.value);
        this.render();
      });
      const cell = el("td");
      cell.append(select);
      kindRow.append(cell);
    }
    body.append(kindRow);
    for (const [key, label, values] of sliders) {
      const row = el("tr");
      row.append(el("th", {}, label));
      for (let f = 0; f < m.features; f++) {
        const input = el("input", {
          type: "range", id: `${key}-${f}`, min: "0", max: String(values.length - 1), step: "1",
          "aria-label": `F${f} ${label}`,
        });
        input.value = String(this.features[f][key]);
        const out = el("output", {id: `${key}-${f}-value`, for: `${key}-${f}`});
        input.addEventListener("input", () => {
          this.features[f][key] = Number(input.value);
          this.render();
        });
        const cell = el("td");
        cell.append(input, out);
        row.append(cell);
      }
      body.append(row);
    }
    const batches = document.getElementById("batches");
    batches.max = String(m.batchesSeen.length - 1);
    batches.addEventListener("input", () => {
      this.batches = Number(batches.value);
      this.render();
    });
    for (const radio of document.querySelectorAll("input[name=mode]")) {
      radio.addEventListener("change", () => {
        this.mode = radio.value;
        this.render();
      });
    }
  }

  buildTables() {
    const m = this.meta;
    const host = document.getElementById("tables");
    for (const stage of STAGES) {
      const box = el("div", {class: "stage"});
      box.append(el("h2", {}, stage.title));
      const table = el("table", {id: `table-${stage.key}`, class: "numbers"});
      const head = el("tr");
      head.append(el("th", {}, "sample"));
      for (let f = 0; f < m.features; f++) head.append(el("th", {}, `F${f}`));
      const thead = el("thead");
      thead.append(head);
      table.append(thead);
      const body = el("tbody");
      for (let r = 0; r < m.rowsShown; r++) {
        const row = el("tr");
        row.append(el("th", {}, String(r)));
        for (let f = 0; f < m.features; f++) row.append(el("td", {id: `cell-${stage.key}-${r}-${f}`}));
        body.append(row);
      }
      table.append(body);
      const foot = el("tfoot");
      const stats = stage.key === "output" ? ["mean", "var", "std"] : ["mean", "var"];
      const names = {mean: "mean", var: "variance", std: "std"};
      for (const stat of stats) {
        const row = el("tr");
        row.append(el("th", {}, names[stat]));
        for (let f = 0; f < m.features; f++) {
          row.append(el("td", {id: `stat-${stage.key}-${stat}-${f}`}));
        }
        foot.append(row);
      }
      table.append(foot);
      box.append(table);
      box.append(el("p", {class: "note"},
        `samples 0–${m.rowsShown - 1} of ${m.batch}; mean and variance over all ${m.batch}`));
      host.append(box);
    }
    const grid = document.getElementById("histograms");
    grid.append(el("div"));
    for (const stage of STAGES) grid.append(el("div", {class: "column-title"}, stage.title));
    for (let f = 0; f < m.features; f++) {
      grid.append(el("div", {class: "row-title"}, `F${f}`));
      for (const stage of STAGES) {
        const figure = el("figure");
        figure.append(svgEl("svg", {id: `hist-${stage.key}-${f}`, viewBox: "0 0 280 130",
          role: "img"}));
        figure.append(el("figcaption", {id: `caption-${stage.key}-${f}`}));
        grid.append(figure);
      }
    }
  }

  drawHistogram(svg, view) {
    const W = 280, H = 130, left = 30, right = 10, top = 8, bottom = 26;
    const [lo, hi] = view.range;
    const counts = Array.from(view.hist);
    const peak = Math.max(1, ...counts);
    const width = (W - left - right) / counts.length;
    const y = (count) => top + (H - top - bottom) * (1 - count / peak);
    const x = (value) => left + (W - left - right) * (value - lo) / (hi - lo);
    svg.replaceChildren();
    svg.append(svgEl("line", {x1: left, x2: W - right, y1: H - bottom, y2: H - bottom,
      class: "axis"}));
    svg.append(svgEl("line", {x1: left, x2: left, y1: top, y2: H - bottom, class: "axis"}));
    counts.forEach((count, i) => {
      const edge = view.clipped && (i === 0 || i === counts.length - 1);
      svg.append(svgEl("rect", {x: left + i * width + 0.5, y: y(count), width: width - 1,
        height: H - bottom - y(count), class: edge ? "bar edge" : "bar"}));
    });
    const ticks = view.clipped ? [[lo, `≤${fmt(lo, 0)}`], [(lo + hi) / 2, fmt((lo + hi) / 2, 0)],
      [hi, `≥${fmt(hi, 0)}`]] : [[lo, fmt(lo, 1)], [hi, fmt(hi, 1)]];
    for (const [value, label] of ticks) {
      svg.append(svgEl("text", {x: x(value), y: H - bottom + 14, class: "tick",
        "text-anchor": value === lo ? "start" : value === hi ? "end" : "middle"}, label));
    }
    svg.append(svgEl("text", {x: left - 4, y: top + 8, class: "tick", "text-anchor": "end"},
      String(peak)));
    svg.append(svgEl("text", {x: left - 4, y: H - bottom, class: "tick", "text-anchor": "end"},
      "0"));
    svg.append(svgEl("text", {x: (left + W - right) / 2, y: H - 2, class: "label",
      "text-anchor": "middle"}, "value"));
    const mean = view.stats[0];
    if (mean >= lo && mean <= hi) {
      svg.append(svgEl("line", {x1: x(mean), x2: x(mean), y1: top, y2: H - bottom,
        class: "mean"}));
    }
  }

  render() {
    const m = this.meta;
    for (let f = 0; f < m.features; f++) {
      const s = this.features[f];
      document.getElementById(`mean-${f}-value`).textContent = fmt(m.means[s.mean], 1);
      document.getElementById(`scale-${f}-value`).textContent = fmt(m.scales[s.scale], 1);
      document.getElementById(`gamma-${f}-value`).textContent = fmt(m.gammas[s.gamma], 1);
      document.getElementById(`beta-${f}-value`).textContent = fmt(m.betas[s.beta], 1);
      for (const stage of STAGES) {
        const view = this.view(stage.key, f);
        for (let r = 0; r < m.rowsShown; r++) {
          document.getElementById(`cell-${stage.key}-${r}-${f}`).textContent =
            fmt(view.rows[r] / 100, 2);
        }
        const stats = stage.key === "output" ? ["mean", "var", "std"] : ["mean", "var"];
        stats.forEach((stat, i) => {
          document.getElementById(`stat-${stage.key}-${stat}-${f}`).textContent =
            fmt(view.stats[i], 3);
        });
        this.drawHistogram(document.getElementById(`hist-${stage.key}-${f}`), view);
        const label = stage.key === "output"
          ? `γ=${fmt(m.gammas[s.gamma], 1)}, β=${fmt(m.betas[s.beta], 1)}: mean ${fmt(view.stats[0], 3)}, std ${fmt(view.stats[2], 3)}`
          : `${stage.key === "input" ? m.kinds[s.kind] + ": " : ""}mean ${fmt(view.stats[0], 3)}, variance ${fmt(view.stats[1], 3)}`;
        document.getElementById(`caption-${stage.key}-${f}`).textContent = label;
      }
    }
    const inference = this.mode === "inference";
    const batches = document.getElementById("batches");
    batches.disabled = !inference;
    document.getElementById("batches-value").textContent = String(m.batchesSeen[this.batches]);
    const running = document.getElementById("running");
    running.replaceChildren();
    if (inference) {
      running.append(`Inference after k = ${m.batchesSeen[this.batches]} training batches of the same `
        + "distributions: each feature is normalized with its running statistics, not the batch's.");
      for (let f = 0; f < m.features; f++) {
        const [mean, variance] = this.slice("running", [this.batches, this.column(f)]);
        const item = el("span", {class: "running-stat"});
        item.append(`F${f}: running mean `, el("b", {id: `running-mean-${f}`}, fmt(mean, 3)),
          ", running variance ", el("b", {id: `running-var-${f}`}, fmt(variance, 3)));
        running.append(item);
      }
    } else {
      running.append("Training: each feature is normalized with the mean and variance of this "
        + "batch (the input table's last rows), so every normalized column has mean 0 and "
        + "variance 1, and every output column mean β and standard deviation γ.");
    }
    document.body.dataset.mode = this.mode;
  }
}

async function main() {
  const meta = JSON.parse(document.getElementById("meta").textContent);
  for (const node of document.querySelectorAll("#batch-size, .batch-size")) {
    node.textContent = String(meta.batch);
  }
  document.getElementById("momentum").textContent = String(meta.momentum);
  document.getElementById("normalized-range").textContent =
    `[${meta.ranges.normalized.join(", ")}]`;
  document.getElementById("output-range").textContent = `[${meta.ranges.output.join(", ")}]`;
  document.getElementById("provenance").textContent =
    `Every number in the tables, statistics and histograms above was computed by bncupy ${meta.bncupy} `
    + `(${meta.backend} backend) when \`bncupy demo\` wrote this page: values and statistics by `
    + "bncupy.batch_norm, bncupy.BatchNorm1d and bncupy.moments (standard deviations as the "
    + "square root of those variances), histogram counts by NumPy from those values. The page "
    + "only looks them up and loads nothing from the network. The training curves are this run "
    + "of the demo, whose batch-norm layers are bncupy's.";
  const explorer = new Explorer(meta, await decode(meta));
  explorer.buildControls();
  explorer.buildTables();
  explorer.render();
  document.body.dataset.ready = "1";
}

main().catch((error) => {
  document.body.dataset.error = String(error);
  document.body.prepend(el("p", {class: "error"}, `Could not show the explorer: ${error}`));
});
