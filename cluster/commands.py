"""`emf cluster up|down|status` and `emf submit`: argument parsing only (the work is in local.py, submit.py)."""
from __future__ import annotations

import sys

from emf_dist.config import add_config_argument


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="the local Ray head on 127.0.0.1 with token authentication",
                              description="Start, stop or inspect the embedded local cluster: a Ray head on 127.0.0.1 "
                                          "with token authentication (the token lives in ~/.ray/auth_token and is "
                                          "created there if missing). Ports are settable, e.g. port=6380 "
                                          "dashboard_port=8266.")
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    for action, text in (("up", "start the head (no-op if it runs)"), ("down", "stop the head this command started"),
                         ("status", "nodes and resources")):
        a = sub.add_parser(action, help=text)
        add_config_argument(a, "cluster/local.py: LocalClusterConfig", "dashboard_port=8266")
    p.set_defaults(run=_run_cluster)

    s = subparsers.add_parser("submit", help="run a pipeline as a Ray job (job submission API, token auth)",
                              description="Submit `emf pipeline run SPEC` as one Ray job: the working directory, "
                                          "extra pip requirements and the environment variables the spec names in "
                                          "job.env_vars (their values sealed with the cluster token, never written "
                                          "in clear) go with it. Prints the job id; --follow streams the logs and "
                                          "exits non-zero when the job fails.")
    s.add_argument("spec", help="pipeline spec file (inside job.working_dir) or packaged name (emf, retrain)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the spec")
    s.add_argument("--address", default=None,
                   help="job API of the cluster, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS, else the "
                        "head `emf cluster up` started)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its outcome")
    s.set_defaults(run=_run_submit)


def _run_cluster(args) -> int:
    from cluster import local
    from emf_dist.config import parse_cli

    cfg = parse_cli(local.LocalClusterConfig, args.config)
    try:
        if args.cluster_command == "up":
            local.up(cfg)
        elif args.cluster_command == "down":
            local.down(cfg)
        else:
            return 0 if local.status(cfg) is not None else 1
    except (local.ClusterError, OSError) as err:
        print(f"emf cluster {args.cluster_command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _run_submit(args) -> int:
    from cluster.auth import NoToken
    from cluster.submit import submit

    try:
        outcome = submit(args.spec, list(args.overrides), address=args.address, follow=args.follow)
    except (NoToken, OSError, RuntimeError) as err:  # no token, head unreachable, submission rejected
        print(f"emf submit: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # Ray's AuthenticationError (a wrong token) is neither of the above
        if type(err).__name__ != "AuthenticationError":
            raise
        print(f"emf submit: error: {err}", file=sys.stderr)
        return 1
    return outcome.exit_code
