"""``kvmove``: the operator's command line for a vllm-kvmove controller.

Every command is one or a few HTTP requests to the controller (:mod:`sidecar.controller`);
nothing here talks to engines or sidecars directly.

    kvmove instances                                   the registered engines and their stores
    kvmove lookup (--prompt TEXT | --tokens 1,2,3) [--instance ID]
    kvmove move --from ID --to ID (--prompt | --tokens) [--copy] [--wait]
    kvmove status EVENT_ID                             one job
    kvmove cancel EVENT_ID [--wait]                    stop a move or copy
    kvmove events [--limit N]                          the latest jobs, newest first
    kvmove pin|unpin --instance ID (--prompt | --tokens)
    kvmove clear --instance ID [--prompt | --tokens]   no prefix: the whole store

Global options (before or after the command): ``--controller URL`` (default: env
``KVMOVE_CONTROLLER``, else http://localhost:9000), ``--token TOKEN`` (default: env
``KVMOVE_API_TOKEN``; sent as ``Authorization: Bearer TOKEN``), ``--cacert PEM`` (default:
env ``KVMOVE_CACERT``: the CA bundle an https controller is verified with), ``--json`` (print
the controller's JSON answer instead of a table; ``move --wait --json`` prints the job's final
status).

Exit status: 0 success; 1 the job of ``move --wait`` failed (or was cancelled); 2 bad usage,
or the controller answered with an error; 3 the controller could not be reached. Errors are
one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import httpx

from sidecar.httpkit import verify_with
from sidecar.protocol import FINAL_STATES, LOCATION  # LOCATION: the one store location there is

DEFAULT_CONTROLLER = "http://localhost:9000"
# Longer than the controller's own command timeout (60 s), so its error reaches the user.
REQUEST_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.05
BAR_WIDTH = 30

EXIT_JOB_FAILED = 1
EXIT_CONTROLLER_ERROR = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report as one ``kvmove: error: ...`` line, with the exit status to use."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class ControllerClient:
    """The controller's HTTP API; every request goes through :meth:`call`."""

    def __init__(self, base_url: str, token: str | None, cacert: str | None = None):
        self.base_url = base_url if "://" in base_url else f"http://{base_url}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, verify=verify_with(cacert),
                                  timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: dict | None = None,
             params: dict | None = None) -> Any:
        """Send one request and return the decoded JSON answer.

        Raises:
            CliError: the controller could not be reached, answered 4xx/5xx (the message is
                the controller's, with status and kind), or answered something not JSON.
        """
        try:
            r = self._http.request(method, path, json=body, params=params)
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.ConnectTimeout):
                raise CliError(f"cannot reach controller at {self.base_url}: connect timed out",
                               EXIT_UNREACHABLE) from None
            raise CliError(f"controller at {self.base_url} did not answer {method} {path} "
                           f"within {REQUEST_TIMEOUT_S:g} s", EXIT_UNREACHABLE) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise CliError(f"cannot reach controller at {self.base_url}: "
                           f"{str(e) or type(e).__name__}", EXIT_UNREACHABLE) from None
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if r.status_code >= 400:
            err = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(err, dict) and "message" in err:
                raise CliError(f"{err['message']} [{r.status_code} {err.get('kind', '?')}]",
                               EXIT_CONTROLLER_ERROR)
            text = " ".join(r.text.split())[:200] or r.reason_phrase
            raise CliError(f"{method} {path} answered {r.status_code}: {text}", EXIT_CONTROLLER_ERROR)
        if answer is None:
            raise CliError(f"{method} {path} answered {r.status_code} with a body that is not JSON",
                           EXIT_CONTROLLER_ERROR)
        return answer


# -- formatting ------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def print_table(headers: list[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print left-aligned columns, headers first."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def print_json(answer: Any) -> None:
    print(json.dumps(answer, indent=2))


def progress_line(job: dict) -> str:
    """``[#######-------]  50%  1.0 MiB / 2.0 MiB  running`` for a job status (a drain's
    with its units: ``3/8 units``)."""
    total, done = job.get("total_bytes") or 0, job.get("bytes") or 0
    # Chunks the destination already held are not moved: a done job may stop short of total.
    frac = 1.0 if job["status"] == "done" else (min(done / total, 1.0) if total else 0.0)
    filled = round(frac * BAR_WIDTH)
    drain = job.get("drain")
    units = "" if not drain else f"  {drain['units_done']}/{drain['units_total']} units"
    return (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {frac:4.0%}  "
            f"{human_bytes(done)} / {human_bytes(total)}{units}  {job['status']}")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- commands --------------------------------------------------------------------------------
def prefix_body(args: argparse.Namespace) -> dict:
    """The ``tokens``, ``prompt`` or ``all`` field of a request, from ``--tokens`` /
    ``--prompt`` / ``--all``."""
    if getattr(args, "all", False):
        return {"all": True}
    if args.tokens is not None:
        return {"tokens": args.tokens}
    if args.prompt is not None:
        return {"prompt": args.prompt}
    return {}


def cmd_instances(ctl: ControllerClient, args: argparse.Namespace) -> int:
    answer = ctl.call("GET", "/instances")
    if args.json:
        print_json(answer)
        return 0
    instances = sorted(answer["instances"], key=lambda i: i["instance_id"])
    if not instances:
        print("no instances registered")
        return 0
    print_table(["INSTANCE", "STATE", "CHUNKS", "USED / CAPACITY", "ENGINE", "LAST HEARTBEAT"], [
        [i["instance_id"], _state(i), i["num_chunks"],
         f"{human_bytes(i['used_bytes'])} / {human_bytes(i['capacity_bytes'])}",
         i["engine_url"], f"{i['last_heartbeat_s_ago']:.1f} s ago"] for i in instances])
    return 0


def _state(instance: dict) -> str:
    """"up", "down", or for a tensor-parallel engine "up (TP 2)" / "down (1/2 ranks)"; with
    ", draining" while a drain empties it."""
    world = instance.get("world_size", 1)
    if world == 1:
        state = "up" if instance["up"] else "down"
    elif instance["up"]:
        state = f"up (TP {world})"
    else:
        state = f"down ({sum(r['up'] for r in instance.get('ranks', []))}/{world} ranks)"
    return state + (", draining" if instance.get("draining") else "")


def cmd_lookup(ctl: ControllerClient, args: argparse.Namespace) -> int:
    body = prefix_body(args)
    if args.instance is not None:
        body["instance_id"] = args.instance
    answer = ctl.call("POST", "/lookup", body)
    if args.json:
        print_json(answer)
        return 0
    matched = {iid: n for iid, (_, n) in answer["layout_info"].items()}
    if args.instance is not None:
        matched = {args.instance: matched.get(args.instance, 0)}
    if not matched:
        print("no instance holds KV for this prefix")
        return 0
    print_table(["INSTANCE", "MATCHED TOKENS"], sorted(matched.items()))
    return 0


def cmd_move(ctl: ControllerClient, args: argparse.Namespace) -> int:
    kind = "copy" if args.copy else "move"
    answer = ctl.call("POST", "/move", {"old_position": [args.source, LOCATION],
                                        "new_position": [args.destination, LOCATION],
                                        "copy": args.copy, **prefix_body(args)})
    event_id = answer["event_id"]
    if args.json and not args.wait:
        print_json(answer)
    elif not args.json:
        print(f"{kind} {args.source} -> {args.destination}: {plural(answer['num_tokens'], 'token')}"
              f", event {event_id}", flush=True)
    if not args.wait:
        return 0
    job = wait_until_done(ctl, kind, event_id, args.json)
    if not args.json:
        print(f"done: {plural(job['num_chunks'], 'chunk')}, {human_bytes(job['bytes'])} moved "
              f"in {job['elapsed_s']:.3f} s")
    return 0


def cmd_drain(ctl: ControllerClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"instance_id": args.source, "copy": args.copy}
    if args.to:
        body["to"] = args.to
    if args.max_mib_per_s:
        body["max_bytes_per_s"] = int(args.max_mib_per_s * 2**20)
    answer = ctl.call("POST", "/drain", body)
    event_id = answer["event_id"]
    if args.json and not args.wait:
        print_json(answer)
    elif not args.json:
        print(f"drain {args.source} -> {', '.join(answer['destinations'])}, event {event_id}",
              flush=True)
    if not args.wait:
        return 0
    job = wait_until_done(ctl, "drain", event_id, args.json, show=_print_drain)
    if not args.json:
        d = job["drain"]
        print(f"done: {d['units_done']} of {d['units_total']} prefixes "
              f"({plural(d['chunks_done'], 'chunk')}), "
              f"{human_bytes(job['bytes'])} moved in {job['elapsed_s']:.3f} s")
    return 0


def _print_drain(job: dict) -> None:
    """Where a drain put its units, and what did not move."""
    d = job["drain"]
    print_table(["DESTINATION", "PREFIXES", "CHUNKS", "BYTES", ""], [
        [x["instance_id"], x["units"], x["chunks"], human_bytes(x["bytes"]),
         "lost mid-drain" if x["lost"] else ""] for x in d["destinations"]])
    if d["problems"]:
        print_table(["NOT MOVED (FIRST CHUNK)", "CHUNKS", "TOKENS", "OUTCOME", "REASON"], [
            [p["first_chunk"][:16], p["num_chunks"], p["num_tokens"], p["outcome"], p["reason"]]
            for p in d["problems"]])


def wait_until_done(ctl: ControllerClient, kind: str, event_id: str, as_json: bool,
                    show: Callable[[dict], None] | None = None) -> dict:
    """:func:`wait_for_job`, then print it (as JSON, or with ``show``); raise the CLI's
    job-failed error if it did not end ``done``."""
    job = wait_for_job(ctl, event_id)
    if as_json:
        print_json(job)
    elif show is not None:
        show(job)
    if job["status"] in ("failed", "cancelled"):
        raise CliError(f"{kind} {event_id} {job['status']}: "
                       f"{job.get('error') or 'no cause reported'}", EXIT_JOB_FAILED)
    return job


def wait_for_job(ctl: ControllerClient, event_id: str) -> dict:
    """Poll the job until it ended (done, failed or cancelled); draw its progress on stderr.

    On a terminal the bar is redrawn in place; otherwise only the final line is written.
    """
    live = sys.stderr.isatty()
    shown = ""
    try:
        while True:
            job = ctl.call("GET", f"/events/{event_id}")
            final = job["status"] in FINAL_STATES
            line = progress_line(job)
            if live and line != shown:
                sys.stderr.write(f"\r{line.ljust(len(shown))}")  # pad over a longer line
                sys.stderr.flush()
                shown = line
            if final:
                sys.stderr.write("\n" if live else f"{line}\n")
                return job
            time.sleep(POLL_INTERVAL_S)
    except KeyboardInterrupt:
        if live:
            sys.stderr.write("\n")
        raise CliError(f"interrupted; the job goes on (kvmove status {event_id})",
                       EXIT_INTERRUPTED) from None


def cmd_status(ctl: ControllerClient, args: argparse.Namespace) -> int:
    job = ctl.call("GET", f"/events/{args.event_id}")
    if args.json:
        print_json(job)
        return 0
    print_table(["FIELD", "VALUE"], [[k, "" if v is None else v] for k, v in job.items()])
    return 0


def cmd_cancel(ctl: ControllerClient, args: argparse.Namespace) -> int:
    params = {"wait": 60} if args.wait else None
    job = ctl.call("POST", f"/events/{args.event_id}/cancel", params=params)
    if args.json:
        print_json(job)
    elif args.wait:
        print(f"{job['status']}: {human_bytes(job['bytes'])} of {human_bytes(job['total_bytes'])} "
              f"moved{': ' + job['error'] if job['error'] else ''}")
    else:
        print(f"cancel requested; {args.event_id} is {job['status']} "
              f"(kvmove status {args.event_id})")
    return 0


def cmd_events(ctl: ControllerClient, args: argparse.Namespace) -> int:
    answer = ctl.call("GET", "/events", params={"limit": args.limit})
    if args.json:
        print_json(answer)
        return 0
    if not answer["events"]:
        print("no events")
        return 0
    print_table(["EVENT", "KIND", "STATUS", "SOURCE", "DESTINATION", "TOKENS", "BYTES",
                 "ELAPSED", "ERROR"], [
        [j["event_id"], j["kind"], j["status"], j["source"], j["destination"] or "-",
         j["num_tokens"], human_bytes(j["bytes"]), f"{j['elapsed_s']:.3f} s", j["error"] or ""]
        for j in answer["events"]])
    return 0


def cmd_store_op(ctl: ControllerClient, args: argparse.Namespace) -> int:
    """``pin``, ``unpin`` and ``clear``: one request to ``/<command>``."""
    answer = ctl.call("POST", f"/{args.command}", {"instance_id": args.instance,
                                                   "location": LOCATION, **prefix_body(args)})
    if args.json:
        print_json(answer)
        return 0
    done = {"pin": "pinned", "unpin": "unpinned", "clear": "cleared"}[args.command]
    what = plural(answer["num_chunks"], "chunk")
    if prefix_body(args):
        what = f"{plural(answer['num_tokens'], 'token')} ({what})"
    print(f"{done} {what} at {args.instance}, event {answer['event_id']}")
    return 0


# -- argument parsing ------------------------------------------------------------------------
def token_list(text: str) -> list[int]:
    """Parse ``--tokens``: comma-separated token ids, e.g. ``1,2,3``."""
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not tokens:
        raise argparse.ArgumentTypeError("no token ids given")
    return tokens


def add_prefix_args(parser: argparse.ArgumentParser, required: bool,
                    every: str = "") -> None:
    """``--prompt TEXT | --tokens 1,2,3``: the prefix whose KV a command is about (``every``:
    the help of an ``--all`` among them, when the command can take everything)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--prompt", help="prompt text (tokenized by the engine's /tokenize)")
    group.add_argument("--tokens", type=token_list, metavar="1,2,3",
                       help="prompt token ids, comma-separated")
    if every:
        group.add_argument("--all", action="store_true", help=every)


def add_global_args(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """``--controller``, ``--token``, ``--json``. Subcommands take them too, with no defaults
    of their own, so a value given before the command is not overwritten."""
    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS
    parser.add_argument("--controller", metavar="URL",
                        default=default(os.environ.get("KVMOVE_CONTROLLER", DEFAULT_CONTROLLER)),
                        help="controller base URL (env KVMOVE_CONTROLLER; default "
                             f"{DEFAULT_CONTROLLER})")
    parser.add_argument("--token", default=default(os.environ.get("KVMOVE_API_TOKEN")),
                        help="API token, sent as 'Authorization: Bearer TOKEN' (env KVMOVE_API_TOKEN)")
    parser.add_argument("--cacert", metavar="PEM",
                        default=default(os.environ.get("KVMOVE_CACERT")),
                        help="CA bundle to verify an https controller with (env KVMOVE_CACERT; "
                             "default: the system's)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the controller's JSON answer instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmove", description="Inspect and move vLLM KV cache through a vllm-kvmove controller.",
        epilog="exit status: 0 ok, 1 job failed or cancelled (move/drain --wait), 2 bad usage or "
               "controller error, 3 controller unreachable")
    add_global_args(parser, with_defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    add_global_args(common, with_defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[ControllerClient, argparse.Namespace], int],
                help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    command("instances", cmd_instances,
            "list registered instances: state, chunks, store use, engine URL, last heartbeat")

    lookup = command("lookup", cmd_lookup, "show which instances hold KV for a prefix, and how many "
                                           "of its tokens")
    add_prefix_args(lookup, required=True)
    lookup.add_argument("--instance", metavar="ID",
                        help="show only this instance (it also tokenizes --prompt)")

    move = command("move", cmd_move, "move (or copy) the KV of a prefix from one instance to another")
    move.add_argument("--from", dest="source", required=True, metavar="INSTANCE",
                      help="instance holding the KV")
    move.add_argument("--to", dest="destination", required=True, metavar="INSTANCE",
                      help="instance to receive it")
    add_prefix_args(move, required=True,
                    every="everything the source holds, in one job (whole prefixes)")
    move.add_argument("--copy", action="store_true", help="keep the KV at the source too")
    move.add_argument("--wait", action="store_true",
                      help="wait for the job to end, showing progress on stderr; exit 1 if it fails")

    drain = command("drain", cmd_drain, "move everything an instance holds to other instances "
                                        "(whole prefixes where they fit, pins carried over)")
    drain.add_argument("--from", dest="source", required=True, metavar="INSTANCE",
                       help="instance to empty")
    drain.add_argument("--to", type=lambda s: [x for x in s.split(",") if x], metavar="ID,ID",
                       help="destinations (default: every other instance that can take its KV)")
    drain.add_argument("--copy", action="store_true", help="keep the KV at the source too")
    drain.add_argument("--max-mib-per-s", type=float, metavar="MIB",
                       help="cap this drain's bandwidth")
    drain.add_argument("--wait", action="store_true",
                       help="wait for the job to end, showing progress on stderr; exit 1 if not "
                            "everything moved")

    status = command("status", cmd_status, "show one job (move, copy, drain, pin, unpin, clear)")
    status.add_argument("event_id", metavar="EVENT_ID", help="the job's event id")

    cancel = command("cancel", cmd_cancel, "stop a move, copy or drain: batches in flight "
                                           "finish, the source keeps every chunk not yet moved")
    cancel.add_argument("event_id", metavar="EVENT_ID", help="the job's event id")
    cancel.add_argument("--wait", action="store_true", help="wait (up to 60 s) until it ended")

    events = command("events", cmd_events, "list the latest jobs, newest first")
    events.add_argument("--limit", type=int, default=20, metavar="N",
                        help="at most N jobs (default 20)")

    for name, help_text in (
            ("pin", "protect the KV of a prefix at an instance from eviction"),
            ("unpin", "let the KV of a prefix at an instance be evicted again"),
            ("clear", "delete the KV of a prefix at an instance (no prefix: its whole store)")):
        store_op = command(name, cmd_store_op, help_text)
        store_op.add_argument("--instance", required=True, metavar="ID", help="the instance")
        add_prefix_args(store_op, required=name != "clear")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console script ``kvmove``; returns the exit status (argparse exits 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    ctl = ControllerClient(args.controller, args.token, args.cacert)
    try:
        return args.run(ctl, args)
    except CliError as e:
        print(f"kvmove: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("kvmove: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ctl.close()


if __name__ == "__main__":
    raise SystemExit(main())
