"""The web console: the manager's pages for people, served at / on the manager's own port.

Contract
--------
* `mount(app, ctx)` (console/app.py) adds the console to the manager's FastAPI app and
  returns the `SessionGate` the HTTP guard needs (`web/guard.py`): every path outside /api/,
  /openapi.json and the public ones (sign-in page, /static/, /docs) needs a console session;
  a page without one is sent to /login, an htmx fragment gets 401 + `HX-Redirect`, anything
  else 401. The API keeps its bearer tokens and never takes a session cookie.
* Sign-in takes the env's access token (`auth.token_matches`, constant time) and sets a
  signed, HttpOnly, SameSite=Strict cookie with an expiry (session.py; settings `console.*`).
  Every write carries the session's CSRF token, or is refused with 403 (csrf.py).
* Routes only read the request, call the services the API calls (`manager.tasks`, the
  context's `trigger_now`, `kill_run`, `run_output`; node add/remove through the API's own
  routes) and render a template; changes are recorded as made by the token via `console`.
  The console holds no logic of its own about tasks, runs or nodes.
* Pages are server-rendered Jinja2 (StrictUndefined, autoescape) with htmx for the parts
  that update in place; charts are uPlot. Every asset is vendored under static/vendor/ with
  its version in its name (static/vendor/VENDORED.md): no page loads anything from another
  host, so the console works offline.

Modules: app.py (mount, sign-in/out, /docs, errors), session.py, csrf.py, render.py
(templates and shared helpers), one module per group of pages: tasks.py, runs.py, nodes.py.
"""
