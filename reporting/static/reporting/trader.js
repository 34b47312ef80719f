// The trader dashboard: renders the snapshot embedded in the page, then applies the ws/trader/ feed.
// Charts: TradingView lightweight-charts, vendored under static/vendor/lightweight-charts/.
"use strict";
(function () {
  var LWC = window.LightweightCharts;
  var COLORS = ["#1d4fb8", "#b35c00", "#17692f", "#8a2be2", "#a11d1d", "#00838f", "#6d5600"];
  var RECENT_FILLS = 50;
  var charts = {strategies: {}, intraday: null, intradaySeries: {}};
  window.traderCharts = charts;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) child = "—";
      node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    });
    return node;
  }
  function num(text, extra) {
    var cls = "num" + (extra ? " " + extra : "");
    if (text && text.charAt(0) === "-") cls += " neg";
    else if (text && Number(text) > 0 && extra === "pnl") cls += " pos";
    return el("td", {"class": cls}, [text]);
  }
  // Times arrive as ISO 8601 in the display zone; their wall-clock part is shown as is.
  function fmt(iso) { return iso ? iso.slice(0, 19).replace("T", " ") : "—"; }
  // lightweight-charts shows UTC: feeding it the wall-clock part as if UTC shows display-zone times.
  function chartTime(iso) { return Math.floor(Date.parse(iso.slice(0, 19) + "Z") / 1000); }
  function account(row) { return row.account_name + " #" + row.account; }
  function fill(tbody, rows) {
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    rows.forEach(function (row) { tbody.appendChild(row); });
  }
  function newChart(box, options) {
    var base = {
      autoSize: true,
      layout: {background: {color: "#ffffff"}, textColor: "#39414f"},
      grid: {vertLines: {color: "#f0f2f5"}, horzLines: {color: "#f0f2f5"}}
    };
    Object.keys(options || {}).forEach(function (key) { base[key] = options[key]; });
    return LWC.createChart(box, base);
  }

  // --- PnL per strategy ------------------------------------------------------------------------
  function strategyCard(perf, index) {
    var existing = charts.strategies[perf.strategy];
    if (existing) return existing;
    var figures = el("div", {"class": "figures"});
    var box = el("div", {"class": "chart"});
    var card = el("section", {"class": "panel strategy-card", "data-strategy": perf.strategy}, [
      el("h3", {}, [perf.name + " (" + perf.strategy + ", " + perf.market_type + ")"]), figures, box
    ]);
    document.getElementById("performance").appendChild(card);
    var chart = newChart(box, {leftPriceScale: {visible: true}, rightPriceScale: {visible: true}});
    var color = COLORS[index % COLORS.length];
    var entry = {
      chart: chart,
      figures: figures,
      equity: chart.addSeries(LWC.LineSeries, {color: color, lineWidth: 2, title: "cumulative"}),
      daily: chart.addSeries(LWC.HistogramSeries, {priceScaleId: "left", title: "daily"}),
      drawdown: chart.addSeries(LWC.AreaSeries, {lineColor: "#a11d1d", topColor: "rgba(161,29,29,0.05)", bottomColor: "rgba(161,29,29,0.35)", title: "drawdown"}, 1),
      points: 0
    };
    charts.strategies[perf.strategy] = entry;
    return entry;
  }
  function renderPerformance(list) {
    document.getElementById("performance-empty").hidden = list.length > 0;
    list.forEach(function (perf, index) {
      var card = strategyCard(perf, index);
      card.figures.textContent = "cumulative " + perf.cumulative_pnl + " · today " + perf.today_pnl + " · max drawdown " + perf.max_drawdown;
      card.equity.setData(perf.days.map(function (d) { return {time: d.day, value: Number(d.cumulative_pnl)}; }));
      card.daily.setData(perf.days.map(function (d) {
        var v = Number(d.daily_pnl);
        return {time: d.day, value: v, color: v < 0 ? "rgba(161,29,29,0.6)" : "rgba(23,105,47,0.6)"};
      }));
      card.drawdown.setData(perf.days.map(function (d) { return {time: d.day, value: Number(d.drawdown)}; }));
      card.points = perf.days.length;
      card.chart.timeScale().fitContent();
    });
    renderIntraday(list);
  }
  function renderIntraday(list) {
    if (!charts.intraday) {
      charts.intraday = newChart(document.getElementById("intraday"), {timeScale: {timeVisible: true, secondsVisible: true}});
    }
    list.forEach(function (perf, index) {
      var series = charts.intradaySeries[perf.strategy];
      if (!series) {
        series = charts.intraday.addSeries(LWC.LineSeries, {color: COLORS[index % COLORS.length], lineWidth: 2, title: perf.strategy});
        charts.intradaySeries[perf.strategy] = series;
      }
      var byTime = {};
      perf.intraday.forEach(function (p) { byTime[chartTime(p.at)] = Number(p.value); });  // one point per second
      series.setData(Object.keys(byTime).map(Number).sort(function (a, b) { return a - b; })
        .map(function (t) { return {time: t, value: byTime[t]}; }));
    });
    charts.intraday.timeScale().fitContent();
  }

  // --- tables ----------------------------------------------------------------------------------
  function renderPositions(rows) {
    fill(document.querySelector("#positions tbody"), rows.length ? rows.map(function (p) {
      return el("tr", {"data-position-id": String(p.id)}, [
        el("td", {}, [account(p)]), el("td", {}, [p.strategy]), el("td", {}, [p.symbol]), el("td", {}, [p.market_type]),
        el("td", {}, [p.side]), num(p.quantity), num(p.average_entry), num(p.mark_price), num(p.unrealized_pnl, "pnl"),
        num(p.realized_pnl, "pnl"), el("td", {"class": "time"}, [fmt(p.marked_at)])
      ]);
    }) : [el("tr", {}, [el("td", {"colspan": "11", "class": "muted"}, ["no open positions"])])]);
  }
  function renderOrders(data) {
    var table = document.getElementById("orders");
    table.querySelectorAll("tbody").forEach(function (body) { body.remove(); });
    if (!data.buckets.length) {
      table.appendChild(el("tbody", {}, [el("tr", {}, [el("td", {"colspan": "11", "class": "muted"}, ["no queued or live orders"])])]));
    }
    data.buckets.forEach(function (b) {
      var body = el("tbody", {"class": "bucket", "data-bucket": b.account + ":" + b.market_type + ":" + b.symbol + ":" + b.bucket}, [
        el("tr", {"class": "head"}, [el("td", {"colspan": "11"}, [
          account(b) + " · " + b.exchange + " " + b.market_type + " · " + b.symbol + " · " + b.bucket +
          " · " + b.live + " of " + b.slots + " slots used"
        ])])
      ]);
      b.orders.forEach(function (o) {
        body.appendChild(el("tr", {"data-order-key": o.order_key}, [
          num(o.rank === null ? "—" : String(o.rank)), el("td", {}, [el("span", {"class": "badge " + o.location}, [o.location])]), el("td", {}, [o.status]),
          el("td", {}, [o.strategy]), el("td", {}, [o.side]), el("td", {}, [o.order_type]), num(o.price), num(o.stop_price),
          num(o.quantity), num(o.filled_quantity), el("td", {"class": "reason"}, [o.reason])
        ]));
      });
      table.appendChild(body);
    });
    var more = document.getElementById("orders-truncated");
    more.hidden = !data.truncated;
    more.textContent = data.truncated ? data.truncated + " more orders not shown (see the API or admin)" : "";
  }
  function fillRow(f) {
    return el("tr", {"data-fill-id": String(f.id)}, [
      num(String(f.id)), el("td", {"class": "time"}, [fmt(f.filled_at)]), el("td", {}, [account(f)]), el("td", {}, [f.strategy]),
      el("td", {}, [f.symbol + " " + f.market_type]), el("td", {}, [f.side]), num(f.quantity), num(f.price),
      num(f.fee + (f.fee_currency ? " " + f.fee_currency : "")), num(f.realized_pnl, "pnl"), el("td", {}, [f.source])
    ]);
  }
  function renderFills(rows) { fill(document.querySelector("#fills tbody"), rows.map(fillRow)); }
  function addFill(f) {
    var body = document.querySelector("#fills tbody");
    if (body.querySelector('tr[data-fill-id="' + f.id + '"]')) return;
    var row = fillRow(f), before = null;
    body.querySelectorAll("tr[data-fill-id]").forEach(function (other) {
      if (!before && Number(other.dataset.fillId) < f.id) before = other;
    });
    body.insertBefore(row, before);
    while (body.rows.length > RECENT_FILLS) body.deleteRow(body.rows.length - 1);
    row.classList.add("flash");
  }
  function renderBalances(rows) {
    fill(document.querySelector("#balances tbody"), rows.length ? rows.map(function (b) {
      var parts = b.strategies.map(function (s) { return s.strategy + ": " + s.allocated + " (" + s.unrealized_pnl + ")"; });
      return el("tr", {}, [
        el("td", {}, [account(b)]), el("td", {}, [b.exchange]), el("td", {}, [b.market_type]),
        num(b.total ? b.total + (b.source === "FALLBACK" ? " (fallback)" : "") : "not read yet"),
        el("td", {"class": "time"}, [fmt(b.taken_at)]), el("td", {}, [parts.join(" · ") || "—"])
      ]);
    }) : [el("tr", {}, [el("td", {"colspan": "6", "class": "muted"}, ["no accounts"])])]);
  }

  function renderSignals(rows) {
    fill(document.querySelector("#signals tbody"), rows.length ? rows.map(function (sig) {
      var outcomes = Object.keys(sig.by_outcome).map(function (k) { return k + " " + sig.by_outcome[k]; });
      function pair(a, b) { return (a === null ? "—" : a) + " / " + (b === null ? "—" : b); }
      return el("tr", {"data-signal-id": String(sig.id)}, [
        num(String(sig.id)), el("td", {"class": "time"}, [fmt(sig.received_at)]), el("td", {}, [sig.strategy]),
        el("td", {}, [[sig.source, sig.side, sig.order_type, sig.symbol].filter(Boolean).join(" ")]),
        num(String(sig.followers)), el("td", {}, [outcomes.join(", ")]),
        num(pair(sig.acknowledged_median_s, sig.acknowledged_p99_s)), num(sig.filled_median_s),
        num(pair(sig.slippage_avg_bps, sig.slippage_worst_bps)), el("td", {}, [sig.failures.join("; ") || "—"])
      ]);
    }) : [el("tr", {}, [el("td", {"colspan": "10", "class": "muted"}, ["no signals yet"])])]);
  }

  var PANELS = {
    performance: renderPerformance, positions: renderPositions, orders: renderOrders, balances: renderBalances,
    signals: renderSignals
  };
  function renderAll(snapshot) {
    Object.keys(PANELS).forEach(function (name) { PANELS[name](snapshot[name]); });
    renderFills(snapshot.fills);
  }
  renderAll(JSON.parse(document.getElementById("trader-snapshot").textContent));

  // --- live feed -------------------------------------------------------------------------------
  openFeed(function () { return "/ws/trader/"; }, function (message) {
    if (message.type === "snapshot") renderAll(message);
    else if (message.type === "fill") addFill(message);
    else if (PANELS[message.type]) PANELS[message.type](message.data);
  }, document.getElementById("feed-state"), "signed out (sign in and reload)");
})();
