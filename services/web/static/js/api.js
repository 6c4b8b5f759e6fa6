// The JSON API (the QueryService over HTTP). The session cookie travels by itself
// (same origin); the page never sees the token. A 401 from any call raises Unauthorized,
// which the router turns into the login page.

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.details = (body && body.details) || [];
  }
}

export class Unauthorized extends ApiError {}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const one of Array.isArray(value) ? value : [value]) search.append(key, String(one));
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

async function errorBody(response) {
  try {
    return await response.json();
  } catch (err) {
    return {message: `HTTP ${response.status} ${response.statusText}`};
  }
}

export async function get(path, params) {
  const response = await fetch(path + query(params), {
    credentials: "same-origin", headers: {Accept: "application/json"}, cache: "no-store",
  });
  if (response.ok) return response.json();
  const body = await errorBody(response);
  if (response.status === 401) throw new Unauthorized(401, body);
  throw new ApiError(response.status, body);
}

export function runPath(runId, suffix) {
  return "/v1/runs/" + encodeURIComponent(runId) + (suffix || "");
}

// Every page of a list method, concatenated (used for short lists: epochs).
export async function allPages(path, params, field) {
  const rows = [];
  let token = "";
  do {
    const page = await get(path, {...params, page_token: token});
    rows.push(...(page[field] || []));
    token = page.nextPageToken || "";
  } while (token);
  return rows;
}

export function watchUrl(runId) {
  return runPath(runId, ":watch");
}
