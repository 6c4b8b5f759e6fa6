// The login page: a plain HTML form posting the token to /auth/login, which sets the HttpOnly
// session cookie and redirects; no script ever reads the token.
import {el} from "./dom.js";

export function loginView(ctx) {
  document.title = "Log in - epochlens";
  const input = el("input", {id: "token", name: "token", type: "password", required: true,
    autocomplete: "off", spellcheck: "false", "aria-describedby": "token-help"});
  const form = el("form", {id: "login-form", method: "post", action: "/auth/login"},
    el("label", {for: "token"}, "Access token"), input,
    el("p", {id: "token-help", class: "hint"},
      "Paste the token epochlens gave you (or open the one-time link `epochlens ui` prints)."),
    el("button", {type: "submit"}, "Log in"));
  ctx.main.append(el("section", {class: "card login", "aria-labelledby": "login-title"},
    el("h1", {id: "login-title"}, "Log in to epochlens"),
    form));
  input.focus();
}
