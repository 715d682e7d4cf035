import os

# The Hub is unreachable here and never needed: tiny models are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from serve_app.ray_env import let_children_take_ctrl_c

# The Serve instances the tests start stop on SIGINT, also when pytest runs as a background job.
let_children_take_ctrl_c()
