"""gunicorn settings of the floor contender: the balancer's own (gunicorn.conf.py), without its app hook."""

import os

_balancer_conf = os.path.join(os.environ["FLOOR_ROOT"], "gunicorn.conf.py")
with open(_balancer_conf) as _f:
    exec(compile(_f.read(), _balancer_conf, "exec"))


def post_worker_init(worker):
    """Nothing: the balancer's hook starts its probes, and the floor has none."""
