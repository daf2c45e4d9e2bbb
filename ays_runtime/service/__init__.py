"""Running a daemon as an operating-system service, in small modules:

layout.py    where a role's service keeps its pidfile, reload record and log file
pidfile.py   the pidfile: written atomically, stale pids recognised
systemd.py   sd_notify: one datagram to $NOTIFY_SOCKET
handover.py  reload without interruption: the listening socket passed to a new process
runner.py    the service's main loop: signals recorded, handled there (handle_hup, ...)
"""
