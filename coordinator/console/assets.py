"""The console's stylesheet and script, served as files so the Content-Security-Policy
can forbid every inline script and style. Pure (constants).

Colours meet WCAG AA: text #1a1a1a and links #0b57d0 on white (17:1 and 6.3:1), the
focus ring #b45309 (5:1 against white, above the 3:1 asked of non-text contrast).

The script is progressive enhancement only: every page is whole without it. It polls
the URL in ``body[data-progress-url]`` every two seconds and writes each job's numbers
into the elements of ``[data-job=<id>]`` marked ``data-count``, and its progress bar;
it stops once every job on the page is final or the session has ended, and on any other
error keeps the page as is and tries again.
"""

from __future__ import annotations

CSS = """\
*{box-sizing:border-box}
body{font:1rem/1.5 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fff}
header{display:flex;flex-wrap:wrap;align-items:center;gap:1rem;padding:.5rem 1rem;
  border-bottom:1px solid #6b6b6b;background:#f3f4f6}
.brand{font-weight:700;margin:0}
nav ul{display:flex;gap:1rem;list-style:none;margin:0;padding:0}
.logout{margin-left:auto}
main{padding:1rem;max-width:80rem}
a{color:#0b57d0}
a:focus-visible,button:focus-visible,input:focus-visible,select:focus-visible,
main:focus-visible{outline:3px solid #b45309;outline-offset:2px}
.skip{position:absolute;left:-999px;top:0;background:#fff;padding:.5rem}
.skip:focus{left:1rem}
button,.button{font:inherit;padding:.3rem .8rem;color:#fff;background:#0b57d0;
  border:1px solid #0b57d0;border-radius:.25rem;text-decoration:none;cursor:pointer}
table{border-collapse:collapse;margin:1rem 0}
th,td{border:1px solid #6b6b6b;padding:.25rem .5rem;text-align:left;vertical-align:top}
caption{text-align:left;font-weight:700}
td form{margin:0}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dd{margin:0}
.notice{padding:.5rem;border-left:4px solid #0b57d0;background:#eef3fd}
.error{padding:.5rem;border-left:4px solid #b3261e;background:#fcefee}
.pager{display:flex;gap:1rem}
progress{width:8rem}
"""

JS = """\
(function () {
  "use strict";
  var url = document.body.getAttribute("data-progress-url");
  if (!url || !window.fetch) { return; }
  function apply(job) {
    document.querySelectorAll("[data-job]").forEach(function (scope) {
      if (scope.getAttribute("data-job") !== job.job_id) { return; }
      scope.querySelectorAll("[data-count]").forEach(function (cell) {
        var value = job[cell.getAttribute("data-count")];
        if (value !== undefined) { cell.textContent = String(value); }
      });
      scope.querySelectorAll("progress").forEach(function (bar) {
        bar.max = Math.max(job.total, 1);
        bar.value = job.total ? job.done : 1;
      });
    });
  }
  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (r.status === 401) { return {jobs: [], loggedOut: true}; }
        return r.ok ? r.json() : null;
      })
      .then(function (data) {
        if (!data) { return true; }
        if (data.loggedOut) { return false; }
        data.jobs.forEach(apply);
        return !data.jobs.every(function (job) { return job.final; });
      })
      .catch(function () { return true; })
      .then(function (again) { if (again) { window.setTimeout(tick, 2000); } });
  }
  window.setTimeout(tick, 2000);
}());
"""
