// Reconnecting client of the polling websocket feeds (ws/scheduler/, ws/trader/); shared by the dashboards.
// openFeed(path, onMessage, badge, forbiddenText): `path` is a function (the URL may carry a cursor);
// `badge` shows the state: connecting, live (after a snapshot), reconnecting (backoff 1 s … 30 s), or
// `forbiddenText` after a 4403 close, when reconnecting would not help.
"use strict";
window.openFeed = function (path, onMessage, badge, forbiddenText) {
  var delay = 1000;
  function setState(text, cls) {
    badge.textContent = text;
    badge.className = "badge" + (cls ? " " + cls : "");
  }
  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + path());
    socket.onopen = function () { setState("connecting"); };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "snapshot") {
        delay = 1000;
        setState("live", "live");
      }
      onMessage(message);
    };
    socket.onclose = function (event) {
      if (event.code === 4403) {
        setState(forbiddenText, "closed");
        return;
      }
      setState("reconnecting", "closed");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
};
