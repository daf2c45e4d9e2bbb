// Ays console: the few behaviours htmx attributes do not cover. No other script, no CDN.
(function () {
  "use strict";

  // A task form shows the fields of its type (shell or http) only.
  function showPayload(form) {
    var type = form.querySelector("#task_type");
    if (!type) return;
    form.querySelectorAll(".payload").forEach(function (box) {
      box.hidden = box.dataset.taskType !== type.value;
    });
  }

  // "Select all" checkboxes of a table of rows.
  function selectAll(box) {
    box.addEventListener("change", function () {
      var form = box.closest("form");
      form.querySelectorAll('input[name="' + box.dataset.selectAll + '"]').forEach(function (c) {
        c.checked = box.checked;
      });
    });
  }

  // Forms that ask before they do something that cannot be undone.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  // A running job's output, followed by server-sent events until it ends.
  function follow(pre) {
    var source = new EventSource(pre.dataset.stream);
    var state = document.getElementById("output-state");
    source.addEventListener("output", function (e) {
      var data = JSON.parse(e.data);
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(data.text));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    });
    source.addEventListener("status", function (e) {
      var data = JSON.parse(e.data);
      var badge = document.getElementById("run-status");
      if (badge) { badge.textContent = data.status; badge.className = "badge s-" + data.status; }
    });
    source.addEventListener("end", function (e) {
      var data = JSON.parse(e.data);
      source.close();
      if (state) state.textContent = "The run has ended: " + data.status + ".";
      pre.removeAttribute("data-stream");
      var kill = document.getElementById("kill-form");
      if (kill) kill.hidden = true;
      if (window.htmx && pre.dataset.summary) {
        window.htmx.ajax("GET", pre.dataset.summary, { target: "#summary", swap: "outerHTML" });
      }
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED && state) {
        state.textContent = "The live output stopped; reload the page to read it.";
      }
    };
  }

  // Charts: a .chart element followed by <script type="application/json" class="chart-data">
  // holding {x: [unix seconds], series: [{label, values, points?, color?}], y?: label}.
  function chart(el) {
    var holder = el.nextElementSibling;
    if (!holder || !holder.classList.contains("chart-data") || !window.uPlot) return;
    var data = JSON.parse(holder.textContent);
    var dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
    var axis = { stroke: dark ? "#9aa4af" : "#5b6570", grid: { stroke: dark ? "#2f363e" : "#e3e7eb" } };
    var palette = ["#0b5cad", "#b42318", "#1a7f37", "#9a6700", "#6f42c1"];
    var series = [{}];
    data.series.forEach(function (s, i) {
      var color = s.color || palette[i % palette.length];
      series.push(s.points
        ? { label: s.label, stroke: color, width: 0, points: { show: true, size: 7, fill: color } }
        : { label: s.label, stroke: color, width: 2, points: { show: false } });
    });
    var opts = {
      width: Math.max(el.clientWidth, 280),
      height: 220,
      series: series,
      axes: [axis, Object.assign({ label: data.y || "" }, axis)],
      scales: { x: { time: data.time !== false } },
    };
    var plot = new window.uPlot(opts, [data.x].concat(data.series.map(function (s) { return s.values; })), el);
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(el.clientWidth, 280), height: 220 });
    });
  }

  // Heatmap cells: one listener for all of them; a click asks for the tasks behind the cell.
  function heatmap(map) {
    map.addEventListener("click", function (event) {
      var cell = event.target.closest("[data-at]");
      if (!cell || !window.htmx) return;
      window.htmx.ajax("GET", "/forecast/cell?second=0&at=" + encodeURIComponent(cell.dataset.at),
        { target: map.dataset.cellTarget, swap: "innerHTML" });
    });
  }

  function init(root) {
    root.querySelectorAll("form.task-form").forEach(function (form) {
      showPayload(form);
      var type = form.querySelector("#task_type");
      if (type) type.addEventListener("change", function () { showPayload(form); });
    });
    root.querySelectorAll("[data-select-all]").forEach(selectAll);
    root.querySelectorAll("pre[data-stream]").forEach(follow);
    root.querySelectorAll(".chart[data-chart]").forEach(chart);
    root.querySelectorAll(".heatmap[data-cell-target]").forEach(heatmap);
  }

  document.addEventListener("DOMContentLoaded", function () {
    init(document);
    var summary = document.getElementById("error-summary");
    if (summary) summary.focus();
  });
  document.addEventListener("htmx:afterSwap", function (e) {
    init(e.target);
    // A run's summary stops polling once the run has ended: nothing is left to kill.
    var summary = document.getElementById("summary");
    var kill = document.getElementById("kill-form");
    if (summary && kill && !summary.hasAttribute("hx-get")) kill.hidden = true;
  });
})();
