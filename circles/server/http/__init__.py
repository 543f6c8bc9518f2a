"""The server's HTTP edge: everything between an accepted TCP connection and a circle session.

- :mod:`circles.server.http.accepts`: connections counted from ``accept()``, refused near the
  descriptor limit;
- :mod:`circles.server.http.eager`: TCP connections that send at once when nothing is queued;
- :mod:`circles.server.http.upgrade`: the listening factory: circle WebSocket upgrades straight to
  Autobahn, any other request to the Site;
- :mod:`circles.server.http.site`: the one ``Site`` (operational routes, ``/auth``, webhooks);
- :mod:`circles.server.http.nonce_route`: ``/auth/...``, nonces and signatures over plain HTTP;
- :mod:`circles.server.http.responses`: the JSON answers of every route (status, type, caching);
- :mod:`circles.server.http.request_limits`: requests bounded as they arrive: whole-request deadline, bodies
  (413), heads with a bare-LF line (400);
- :mod:`circles.server.http.playground`: the browser playground.
"""
