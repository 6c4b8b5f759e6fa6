// epochlens web UI: a single-page app over the JSON API. The router maps the page paths the
// server answers with index.html to views; each view renders into <main> and may return a
// cleanup (closing its live stream) run when the page changes. A 401 from the API shows the
// login page; other API errors show their message.
import {ApiError, Unauthorized} from "./js/api.js";
import {clear, el} from "./js/dom.js";
import {compareView} from "./js/compare.js";
import {loginView} from "./js/login.js";
import {runView} from "./js/run.js";
import {runCompareView} from "./js/runcompare.js";
import {runsView} from "./js/runs.js";
import {sampleView} from "./js/sample.js";

const ROUTES = [
  [/^\/$/, (m, ctx) => runsView(ctx)],
  [/^\/runs\/([^/]+)$/, (m, ctx) => runView(ctx, decodeURIComponent(m[1]))],
  [/^\/runs\/([^/]+)\/vs$/, (m, ctx) => runCompareView(ctx, decodeURIComponent(m[1]))],
  [/^\/runs\/([^/]+)\/samples\/(\d+)$/,
    (m, ctx) => sampleView(ctx, decodeURIComponent(m[1]), Number(m[2]))],
  [/^\/compare$/, (m, ctx) => compareView(ctx)],
  [/^\/login$/, (m, ctx) => loginView(ctx)],
];

let current = {generation: 0, cleanups: []};

export function navigate(url, options) {
  const state = (options && options.state) || {};
  if (options && options.replace) history.replaceState(state, "", url);
  else history.pushState(state, "", url);
  window.scrollTo(0, 0);
  render().then(focusMain);
}

// After a navigation the new page's content gets the focus (screen readers announce it;
// Tab continues from there), unless the page already focused something of its own.
function focusMain() {
  const main = document.getElementById("main");
  if (!main.contains(document.activeElement)) main.focus({preventScroll: true});
}

const HTTP_WORDS = {400: "Invalid request", 403: "Not allowed", 404: "Not found",
  409: "Conflict", 429: "Too many requests", 500: "Server error", 501: "Not available",
  503: "Service unavailable", 504: "Timed out"};

function showError(main, err) {
  const message = err instanceof ApiError
    ? `${HTTP_WORDS[err.status] || "Error"} (HTTP ${err.status}): ${err.message}`
    : String(err.message || err);
  main.append(el("div", {class: "card error", role: "alert"}, el("h2", {}, "Something went wrong"),
    el("p", {class: "error-message"}, message)));
}

function fail(generation, err) {
  if (generation !== current.generation) return;
  if (err instanceof Unauthorized) {
    navigate("/login", {replace: true});
    return;
  }
  console.warn("epochlens web:", err);
  showError(document.getElementById("main"), err);
}

function context(generation) {
  const main = clear(document.getElementById("main"));
  return {
    main,
    params: new URLSearchParams(location.search),
    navigate,
    alive: () => generation === current.generation,
    fail: (err) => fail(generation, err),
    onLeave: (cleanup) => current.cleanups.push(cleanup),
  };
}

async function render() {
  for (const cleanup of current.cleanups) cleanup();
  current = {generation: current.generation + 1, cleanups: []};
  const ctx = context(current.generation);
  document.body.classList.toggle("on-login", location.pathname === "/login");
  const route = ROUTES.find(([pattern]) => pattern.test(location.pathname));
  if (!route) {
    showError(ctx.main, new Error(`No page at ${location.pathname}`));
    return;
  }
  try {
    await route[1](location.pathname.match(route[0]), ctx);
  } catch (err) {
    ctx.fail(err);
  }
}

function interceptLinks(event) {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey ||
      event.shiftKey || event.altKey) return;
  const link = event.target.closest && event.target.closest("a[href]");
  if (!link || link.target || link.hasAttribute("download")) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/v1/") ||
      url.pathname.startsWith("/static/") || url.pathname.startsWith("/auth/")) return;
  if (url.pathname === location.pathname && url.search === location.search && url.hash) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
}

document.addEventListener("click", interceptLinks);
window.addEventListener("popstate", render);
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", render);
else render();
