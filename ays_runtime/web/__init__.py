"""What the HTTP APIs share (the manager's, the node's, and the console the manager serves).

guard.py      the ASGI middleware in front of each app: the public routes are declared,
              every other request shows its token before its body is read; refusals go
              to the refusal log; the OpenAPI document states the security and answers
refusals.py   refused requests logged once per source per minute, with a count
fields.py     the field types every route uses: bounded integers, UTC date-times,
              text that can be stored
keepalive.py  idle keep-alive times of Ays servers and clients (the client's below the
              server's, so no request is sent on a connection the server is closing)
"""
