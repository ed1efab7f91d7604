"""submit, load, start, stop, unload, destroy, restart, cat: fleet's output and exit codes,
lazy creation from files and templates, --replace rules, blocking, globs and placement reasons.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from test_fleetctl_harness import (
    GLOBAL,
    HELLO,
    HELLO_TEMPLATE,
    M1,
    M2,
    Cluster,
    Reaction,
    run,
)

from fleetctl.settings import Settings
from fleetctl.unitargs import Found, find_units
from fleetctl.waiting import MachineCache, wait_for_states
from fleetd.model import TargetState
from fleetd.unit.file import parse_unit

M1_IP = "172.17.8.103"
ON_M1 = f"on 113f16a7.../{M1_IP}"
HELLO_V2 = HELLO.replace("Hello World", "Hello World v2")
REASON = "no machine matches MachineMetadata role=db"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cluster:
    monkeypatch.chdir(tmp_path)
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, M1_IP)
    cluster.add_machine(M2, "172.17.8.102")
    cluster.auto = True
    return cluster


def write(name: str, text: str = HELLO) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fleetctl(cluster: Cluster, *args: str, exit_code: int = 0) -> Result:
    """`fleetctl args` on `cluster`, which must exit with `exit_code`."""
    result = cluster.invoke(*args)
    assert result.exit_code == exit_code, result.output
    return result


def desired(cluster: Cluster, name: str) -> str | None:
    unit = cluster.unit(name)
    return unit.target_state.value if unit else None


# ---- submit ----------------------------------------------------------------------------------


def test_submit_local_file(cluster: Cluster) -> None:
    write("hello.service")
    result = cluster.invoke("submit", "hello.service")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "Unit hello.service inactive\n",
        "",
    )
    unit = cluster.unit("hello.service")
    assert (unit.hash, unit.target_state) == (parse_unit(HELLO).hash, TargetState.INACTIVE)
    assert cluster.dump("placements/") == {}  # submit schedules nothing


def test_submit_mangles_names_and_paths(cluster: Cluster) -> None:
    write("hello.service")
    write("units/web.socket", "[Socket]\nListenStream=80\n")
    result = fleetctl(cluster, "submit", "hello", "units/web.socket", "--sign")
    assert result.stdout == "Unit hello.service inactive\nUnit web.socket inactive\n"


def test_submit_several_and_same_again_is_quiet(cluster: Cluster) -> None:
    write("a.service")
    write("b.service")
    assert cluster.invoke("submit", "a.service", "b.service", "a.service").stdout == (
        "Unit a.service inactive\nUnit b.service inactive\n"
    )
    result = cluster.invoke("submit", "a.service")
    assert (result.exit_code, result.output) == (0, "")


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        (
            ["nope.service"],
            {},
            "Error creating units: unable to find Unit(nope.service) in Registry or on filesystem",
        ),
        (
            ["web@1.service"],
            {},
            "Error creating units: unable to find Unit(web@1.service) or template "
            "Unit(web@.service) in Registry or on filesystem",
        ),
        (
            ["bad!.service"],
            {"bad!.service": HELLO},
            "Error creating units: invalid character '!' in unit name",
        ),
        (
            ["broken.service"],
            {"broken.service": "[Unit\nDescription=x\n"},
            "Error creating units: failed getting Unit(broken.service) from file: line 1:",
        ),
        (
            ["pinned.service"],
            {"pinned.service": "[X-Fleet]\nMachineID=abc\nGlobal=true\n"},
            "Error creating units: MachineID cannot be used with Global",
        ),
    ],
)
def test_submit_errors_change_nothing(
    cluster: Cluster, args: list[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        write(name, text)
    result = fleetctl(cluster, "submit", *args, exit_code=1)
    assert result.stderr.startswith(message)
    assert cluster.dump("units/") == {}


def test_bad_name_is_refused_before_anything_is_written(cluster: Cluster) -> None:
    write("good.service")
    fleetctl(cluster, "submit", "good.service", "bad!.service", exit_code=1)
    assert cluster.dump("units/") == {}


def test_submit_refuses_unknown_xfleet_keys_unless_allowed(cluster: Cluster) -> None:
    """fleet only warned; a typo would drop a constraint, so it is an error without the flag,
    and with it fleet's warning and the unit as before."""
    write("odd.service", "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nFrobnicate=yes\n")
    result = fleetctl(cluster, "submit", "odd.service", exit_code=1)
    assert result.stderr == (
        'Error creating units: unit odd.service: unknown option "Frobnicate" in [X-Fleet]'
        " section; add --allow-unknown-options to submit it anyway\n"
    )
    assert cluster.dump("units/") == {}
    result = fleetctl(cluster, "submit", "--allow-unknown-options", "odd.service")
    assert result.stdout == "Unit odd.service inactive\n"
    assert result.stderr == (
        'WARNING: Unit odd.service: unrecognized requirement in [X-Fleet] section: "Frobnicate"\n'
    )


def test_submit_template_and_instances(cluster: Cluster) -> None:
    write("hello@.service", HELLO_TEMPLATE)
    # an instance from the template beside the argument, on disk
    result = cluster.invoke("submit", "hello@1.service")
    assert (result.exit_code, result.stdout) == (0, "Unit hello@1.service inactive\n")
    # the template itself can be submitted; then instances come from the cluster's copy
    assert cluster.invoke("submit", "hello@.service").exit_code == 0
    Path("hello@.service").unlink()
    result = cluster.invoke("submit", "hello@2")
    assert (result.exit_code, result.stdout) == (0, "Unit hello@2.service inactive\n")
    template_hash = parse_unit(HELLO_TEMPLATE).hash
    for name in ("hello@.service", "hello@1.service", "hello@2.service"):
        assert cluster.unit(name).hash == template_hash  # instances share the template's body
    assert len(cluster.dump("bodies/")) == 1


def test_instance_template_in_other_directory(cluster: Cluster) -> None:
    write("units/hello@.service", HELLO_TEMPLATE)
    result = cluster.invoke("submit", "units/hello@7.service")
    assert (result.exit_code, result.stdout) == (0, "Unit hello@7.service inactive\n")


def test_submit_existing_differs_warns(cluster: Cluster) -> None:
    cluster.add_unit("hello.service", HELLO)
    write("hello.service", HELLO_V2)
    result = fleetctl(cluster, "submit", "hello.service")
    assert result.stderr == (
        "WARNING: Unit hello.service in registry differs from local unit file hello.service."
        " Add --replace to override.\n"
    )
    assert cluster.unit("hello.service").hash == parse_unit(HELLO).hash


def test_existing_instance_differs_from_local_template_warns(cluster: Cluster) -> None:
    cluster.add_unit("hello@1.service", HELLO_TEMPLATE)
    write("hello@.service", HELLO_TEMPLATE + "\n[X-Fleet]\nConflicts=hello@*\n")
    result = cluster.invoke("submit", "hello@1.service")
    assert result.stderr == (
        "WARNING: Unit hello@1.service in registry differs from local template unit file"
        " hello@.service. Add --replace to override.\n"
    )


# ---- --replace -------------------------------------------------------------------------------


def test_replace_same_contents_does_nothing(cluster: Cluster) -> None:
    cluster.add_unit("hello.service", HELLO)
    write("hello.service", HELLO)
    result = cluster.invoke("submit", "--replace", "hello.service")
    assert (result.exit_code, result.stdout) == (
        0,
        "Found same Unit(hello.service) in Registry, nothing to do\n",
    )


def test_submit_replace_inactive_unit(cluster: Cluster) -> None:
    cluster.add_unit("hello.service", HELLO)
    write("hello.service", HELLO_V2)
    result = cluster.invoke("submit", "--replace", "hello.service")
    assert (result.exit_code, result.stdout) == (0, "Unit hello.service inactive\n")
    assert cluster.unit("hello.service").hash == parse_unit(HELLO_V2).hash


@pytest.mark.parametrize(
    ("command", "state", "allowed"),
    [
        ("submit", TargetState.LOADED, False),
        ("submit", TargetState.LAUNCHED, False),
        ("load", TargetState.LOADED, True),
        ("load", TargetState.LAUNCHED, False),
        ("start", TargetState.LAUNCHED, True),
    ],
)
def test_replace_allowed_states(
    cluster: Cluster, command: str, state: TargetState, allowed: bool
) -> None:
    cluster.add_unit("hello.service", HELLO, state)
    cluster.place("hello.service", M1)
    cluster.publish("hello.service", M1, state)
    write("hello.service", HELLO_V2)
    blocking = [] if command == "submit" else ["--block-attempts=3"]
    result = cluster.invoke(command, "--replace", "hello.service", *blocking)
    unit = cluster.unit("hello.service")
    if allowed:
        assert result.exit_code == 0, result.output
        assert unit.hash == parse_unit(HELLO_V2).hash
        assert unit.target_state is state  # replaced in place: the desired state is kept
    else:
        assert result.exit_code == 1
        assert result.stderr == (
            f"Warning: can not replace Unit(hello.service) in state '{state.value}',"
            " use the appropriate command\n"
        )
        assert (unit.hash, unit.target_state) == (parse_unit(HELLO).hash, state)


def test_start_replace_waits_for_the_new_body_to_run(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    write("hello.service", HELLO_V2)
    result = fleetctl(cluster, "start", "--replace", "hello.service")
    assert result.stdout == f"Unit hello.service launched {ON_M1}\n"
    states = cluster.dump("states/")
    assert parse_unit(HELLO_V2).hash in next(iter(states.values()))


# ---- load / start ----------------------------------------------------------------------------


def test_load_new_unit(cluster: Cluster) -> None:
    write("hello.service")
    result = fleetctl(cluster, "load", "hello.service")
    assert result.stdout == f"Unit hello.service inactive\nUnit hello.service loaded {ON_M1}\n"
    assert desired(cluster, "hello.service") == "loaded"


def test_start_blocks_until_launched(cluster: Cluster) -> None:
    cluster.reactions["hello.service"] = Reaction(delay=0.05)
    write("hello.service")
    result = fleetctl(cluster, "start", "hello.service")
    assert result.stdout == f"Unit hello.service inactive\nUnit hello.service launched {ON_M1}\n"
    assert result.stderr == ""
    assert desired(cluster, "hello.service") == "launched"


def test_start_existing_unit_by_short_name(cluster: Cluster) -> None:
    cluster.add_unit("hello.service")
    result = cluster.invoke("start", "hello")
    assert (result.exit_code, result.stdout) == (0, f"Unit hello.service launched {ON_M1}\n")


def test_start_already_launched_reports_where(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M2)
    result = fleetctl(cluster, "start", "hello.service")
    assert result.stdout == "Unit hello.service launched on e793afb9.../172.17.8.102\n"


def test_start_unplaceable_says_why_and_fails(cluster: Cluster) -> None:
    cluster.reactions["db.service"] = Reaction(reason=REASON, delay=0)
    write("db.service")
    result = fleetctl(cluster, "start", "--block-attempts=2", "db.service", exit_code=1)
    assert result.stdout == "Unit db.service inactive\n"
    assert result.stderr == (
        f"Unit db.service cannot be placed: {REASON}\n"  # said once, not on every poll
        "Error waiting for units: timed out waiting for unit db.service to report state"
        " launched\n"
    )


def test_start_forever_says_why_once_then_succeeds(cluster: Cluster) -> None:
    cluster.reactions["db.service"] = Reaction(reason=REASON, delay=0, placed_after=0.1)
    cluster.add_unit("db.service")
    result = cluster.invoke("start", "db.service")  # --block-attempts 0: wait forever
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Unit db.service cannot be placed: {REASON}\n"
    assert result.stdout == f"Unit db.service launched {ON_M1}\n"


def test_start_fails_when_systemd_reports_failed(cluster: Cluster) -> None:
    cluster.reactions["crash.service"] = Reaction(active="failed")
    cluster.add_unit("crash.service")
    result = fleetctl(cluster, "start", "crash.service", exit_code=1)
    assert result.stdout == f"Unit crash.service launched {ON_M1}\n"
    assert result.stderr == (
        "Error waiting for systemd unit states: unit crash.service failed in systemd"
        " (loaded/failed/failed)\n"
    )


def test_start_not_active_in_time(cluster: Cluster) -> None:
    cluster.reactions["slow.service"] = Reaction(active="activating")
    cluster.add_unit("slow.service")
    result = fleetctl(cluster, "start", "--block-attempts=2", "slow.service", exit_code=1)
    assert result.stderr == (
        "Error waiting for systemd unit states: Failed to find an active unit slow.service"
        " (systemd: loaded/activating/activating)\n"
    )


def test_start_no_block_prints_triggered_once(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.add_unit("hello.service")
    result = cluster.invoke("start", "--no-block", "hello.service")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit hello.service start\n")
    assert desired(cluster, "hello.service") == "launched"


def test_start_global_and_instances(cluster: Cluster) -> None:
    cluster.add_unit("global.service", GLOBAL)
    write("hello@.service", HELLO_TEMPLATE)
    result = fleetctl(cluster, "start", "global.service", "hello@1.service", "hello@2.service")
    assert result.stdout.splitlines() == [
        "Unit hello@1.service inactive",
        "Unit hello@2.service inactive",
        "Triggered global unit global.service start",
        f"Unit hello@1.service launched {ON_M1}",
        f"Unit hello@2.service launched {ON_M1}",
    ]
    assert desired(cluster, "global.service") == "launched"


@pytest.mark.parametrize("command", ["load", "start"])
def test_templates_cannot_be_activated(cluster: Cluster, command: str) -> None:
    write("hello@.service", HELLO_TEMPLATE)
    result = fleetctl(cluster, command, "hello@.service", exit_code=1)
    assert result.stderr == 'Error creating units: cannot activate template "hello@.service"\n'
    assert cluster.dump("units/") == {}


def test_load_global_does_not_block(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.add_unit("global.service", GLOBAL)
    result = cluster.invoke("load", "global.service")
    assert (result.exit_code, result.stdout) == (0, "Triggered global unit global.service load\n")


def test_load_running_unit_stops_it_as_in_fleet(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    result = cluster.invoke("load", "hello.service")
    assert (result.exit_code, result.stdout) == (0, f"Unit hello.service loaded {ON_M1}\n")
    assert desired(cluster, "hello.service") == "loaded"


# ---- stop / unload / destroy -----------------------------------------------------------------


def test_stop(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    result = fleetctl(cluster, "stop", "hello")
    assert result.stdout == f"Unit hello.service loaded {ON_M1}\n"
    assert result.stderr == "Successfully stopped units [hello.service].\n"
    assert desired(cluster, "hello.service") == "loaded"


def test_stop_glob_several(cluster: Cluster) -> None:
    for name in ("web@1.service", "web@2.service", "db.service"):
        cluster.run_unit(name, M1)
    result = fleetctl(cluster, "stop", "web@*")
    assert result.stdout == (
        f"Unit web@1.service loaded {ON_M1}\nUnit web@2.service loaded {ON_M1}\n"
    )
    assert desired(cluster, "db.service") == "launched"


def test_stop_inactive_unit_fails(cluster: Cluster) -> None:
    cluster.add_unit("idle.service")
    result = fleetctl(cluster, "stop", "idle.service", exit_code=1)
    assert result.stderr == "Unable to stop unit idle.service in state inactive\n"


def test_stop_after_a_start_that_timed_out(cluster: Cluster) -> None:
    # A failed `start` leaves the unit wanted `launched` but on no machine; fleet's stop then
    # refused ("in state inactive"), so the unit started whenever a machine could take it.
    cluster.reactions["db.service"] = Reaction(reason=REASON, delay=0)
    write("db.service")
    assert cluster.invoke("start", "--block-attempts=1", "db.service").exit_code == 1
    assert desired(cluster, "db.service") == "launched"
    result = fleetctl(cluster, "stop", "--block-attempts=1", "db.service")
    assert result.stdout == ""
    assert result.stderr == (
        "Unit db.service is not placed on any machine: it will be loaded, not started, once"
        " placed\nSuccessfully stopped units [db.service].\n"
    )
    assert desired(cluster, "db.service") == "loaded"
    # Stopping it again is no error: nothing is wanted running.
    assert cluster.invoke("stop", "--block-attempts=1", "db.service").exit_code == 0
    result = cluster.invoke("stop", "--no-block", "db.service")
    assert (result.exit_code, result.stdout) == (0, "")


def test_stop_no_block_of_an_unplaced_unit(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.add_unit("db.service", state=TargetState.LAUNCHED)
    cluster.place("db.service", None, REASON)
    result = cluster.invoke("stop", "--no-block", "db.service")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit db.service stop\n")
    assert desired(cluster, "db.service") == "loaded"


def test_stop_of_a_placed_unit_its_agent_has_not_reported_yet(cluster: Cluster) -> None:
    cluster.add_unit("hello.service", state=TargetState.LAUNCHED)
    cluster.place("hello.service", M1)  # placed; the agent has published nothing yet
    result = fleetctl(cluster, "stop", "hello.service")
    assert result.stdout == f"Unit hello.service loaded {ON_M1}\n"
    assert desired(cluster, "hello.service") == "loaded"


# What a failed or interrupted command can leave: (desired state, placement, agent's report).
LEFT_BEHIND = {
    "start timed out, unplaceable": ("launched", None, None),
    "load timed out, unplaceable": ("loaded", None, None),
    "start timed out, agent silent": ("launched", M1, None),
    "start timed out, not active": ("launched", M1, TargetState.LAUNCHED),
    "stop timed out": ("loaded", M1, TargetState.LAUNCHED),
    "unload timed out": ("inactive", M1, TargetState.LAUNCHED),
    "unload timed out, agent unloaded": ("inactive", M1, TargetState.INACTIVE),
}


def _leave(cluster: Cluster, name: str, scenario: str) -> None:
    state, machine, reported = LEFT_BEHIND[scenario]
    cluster.add_unit(name, state=TargetState(state))
    cluster.place(name, machine, "" if machine else REASON)
    if machine is None:
        cluster.reactions[name] = Reaction(reason=REASON, delay=0)
    elif reported is not None:
        cluster.publish(name, machine, reported, "activating", "start")


@pytest.mark.parametrize("scenario", sorted(LEFT_BEHIND))
def test_unload_and_destroy_work_from_any_state(cluster: Cluster, scenario: str) -> None:
    _leave(cluster, "a.service", scenario)
    result = cluster.invoke("unload", "--block-attempts=1", "a.service")
    if scenario == "unload timed out":
        # Already wanted inactive: nothing is written, and this agent stays silent, so the wait
        # times out again; that is the agent's doing, not a refusal.
        assert result.stderr.endswith("Failed to unload units [a.service].\n")
    else:
        assert result.exit_code == 0, result.output
    assert desired(cluster, "a.service") == "inactive"
    result = cluster.invoke("destroy", "a.service")
    assert (result.exit_code, result.stdout) == (0, "Destroyed a.service\n")
    assert cluster.unit("a.service") is None


@pytest.mark.parametrize("scenario", sorted(LEFT_BEHIND))
def test_stop_works_from_any_state_but_never_activated(cluster: Cluster, scenario: str) -> None:
    _leave(cluster, "a.service", scenario)
    result = cluster.invoke("stop", "--block-attempts=1", "a.service")
    if scenario == "unload timed out, agent unloaded":
        # Wanted and seen inactive: stopping would load it. fleet's refusal is kept.
        assert (result.exit_code, result.stderr) == (
            1,
            "Unable to stop unit a.service in state inactive\n",
        )
        assert desired(cluster, "a.service") == "inactive"
        return
    assert result.exit_code == 0, result.output
    assert desired(cluster, "a.service") == "loaded"


def test_stop_unknown_units(cluster: Cluster) -> None:
    result = fleetctl(cluster, "stop", "nope", "x*", exit_code=1)
    assert result.stderr == (
        "Unit nope.service not found\nNo unit matches x*\nUnits not found in registry\n"
    )
    cluster.run_unit("hello.service", M1)
    result = cluster.invoke("stop", "hello", "nope")  # the found ones are still stopped
    assert result.exit_code == 1
    assert desired(cluster, "hello.service") == "loaded"


def test_stop_no_block(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.run_unit("hello.service", M1)
    result = cluster.invoke("stop", "--no-block", "hello.service")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit hello.service stop\n")


def test_unload(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    result = fleetctl(cluster, "unload", "hello.service")
    assert result.stdout == "Unit hello.service inactive\n"
    assert result.stderr == "Successfully unloaded units [hello.service].\n"
    assert desired(cluster, "hello.service") == "inactive"


def test_unload_unplaceable_unit_clears_its_desired_state(cluster: Cluster) -> None:
    # fleet skipped units whose current state is inactive, leaving them wanted "launched".
    cluster.add_unit("db.service", HELLO, TargetState.LAUNCHED)
    cluster.place("db.service", None, REASON)
    fleetctl(cluster, "unload", "db.service")
    assert desired(cluster, "db.service") == "inactive"


def test_unload_global(cluster: Cluster) -> None:
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    result = cluster.invoke("unload", "global.service")
    assert result.stdout == "Triggered global unit global.service unload\n"


def test_destroy_glob_and_names(cluster: Cluster) -> None:
    for name in ("web@1.service", "web@2.service", "db.service", "keep.service"):
        cluster.add_unit(name)
    result = fleetctl(cluster, "destroy", "web@*", "db")
    assert result.stdout == (
        "Destroyed web@1.service\nDestroyed web@2.service\nDestroyed db.service\n"
    )
    assert list(cluster.dump("units/")) == ["/fleet/units/keep.service"]


def test_destroy_accepts_blocking_flags_and_reports_missing(cluster: Cluster) -> None:
    cluster.add_unit("a.service")
    result = fleetctl(cluster, "destroy", "--no-block", "--block-attempts=3", "a", "b", exit_code=1)
    assert result.stdout == "Destroyed a.service\n"
    assert result.stderr == "Unit b.service not found\n"
    result = cluster.invoke("destroy", "a")
    assert (result.exit_code, result.stderr) == (
        1,
        "Unit a.service not found\nUnits not found in registry\n",
    )


# ---- restart ---------------------------------------------------------------------------------


def test_restart_launched_unit(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    seen: list[TargetState] = []
    original = cluster.react

    async def spy(name: str, state: TargetState) -> None:
        seen.append(state)
        await original(name, state)

    cluster.react = spy  # type: ignore[method-assign]
    result = fleetctl(cluster, "restart", "hello.service")
    assert result.stdout == (
        f"Unit hello.service loaded {ON_M1}\nUnit hello.service launched {ON_M1}\n"
    )
    assert seen == [TargetState.LOADED, TargetState.LAUNCHED]


def test_restart_loaded_unit_starts_it(cluster: Cluster) -> None:
    cluster.add_unit("hello.service", HELLO, TargetState.LOADED)
    cluster.place("hello.service", M1)
    cluster.publish("hello.service", M1, TargetState.LOADED, "inactive", "dead")
    result = fleetctl(cluster, "restart", "hello.service")
    assert result.stderr == "Unit hello.service already loaded, starting.\n"
    assert result.stdout == f"Unit hello.service launched {ON_M1}\n"


def test_restart_inactive_unit_fails(cluster: Cluster) -> None:
    cluster.add_unit("idle.service")
    result = fleetctl(cluster, "restart", "idle.service", exit_code=1)
    assert result.stderr == "Unable to restart unit idle.service in state inactive\n"


def test_restart_stops_at_the_first_failure(cluster: Cluster) -> None:
    cluster.run_unit("web@1.service", M1)
    cluster.run_unit("web@2.service", M1)
    cluster.reactions["web@1.service"] = Reaction(active="failed")
    result = fleetctl(cluster, "restart", "web@*", exit_code=1)
    assert "unit web@1.service failed in systemd" in result.stderr
    assert desired(cluster, "web@2.service") == "launched"
    assert "web@2" not in result.stdout  # never touched


def test_restart_global_unit(cluster: Cluster) -> None:
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.publish("global.service", M1)
    result = fleetctl(cluster, "restart", "global.service")
    assert result.stdout == "Triggered global unit global.service restart\n"
    assert desired(cluster, "global.service") == "launched"


def test_restart_global_unit_that_does_not_stop(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.publish("global.service", M1)
    result = fleetctl(cluster, "restart", "--block-attempts=1", "global.service", exit_code=1)
    assert result.stderr == (
        "Error restarting units: timed out waiting for global unit global.service to stop\n"
    )


# ---- cat -------------------------------------------------------------------------------------


def test_cat_prints_the_normalized_unit(cluster: Cluster) -> None:
    text = (
        "# comment\n[Unit]\nDescription = Foo  \n\n[Service]\nExecStart=/bin/a\n[Unit]\nAfter=x\n"
    )
    cluster.add_unit("foo.service", text)
    result = cluster.invoke("cat", "foo")
    assert (result.exit_code, result.stdout) == (
        0,
        "[Unit]\nDescription=Foo\nAfter=x\n\n[Service]\nExecStart=/bin/a\n",
    )


def test_cat_errors(cluster: Cluster) -> None:
    result = cluster.invoke("cat", "nope")
    assert (result.exit_code, result.stderr) == (1, "Unit nope.service not found\n")
    for args in ([], ["a", "b"]):
        result = fleetctl(cluster, "cat", *args, exit_code=2)
        assert "One unit file must be provided" in result.stderr


# ---- more flags and timeouts -----------------------------------------------------------------


def test_load_no_block(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.add_unit("hello.service")
    result = cluster.invoke("load", "--no-block", "hello.service")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit hello.service load\n")


def test_stop_times_out(cluster: Cluster) -> None:
    cluster.auto = False  # no agent: the unit never reports loaded
    cluster.run_unit("hello.service", M1)
    result = fleetctl(cluster, "stop", "--block-attempts", "1", "hello.service", exit_code=1)
    assert result.stderr == (
        "Error waiting for units: timed out waiting for unit hello.service to report state"
        " loaded\nFailed to stop units [hello.service].\n"
    )


def test_unload_glob_no_block_and_timeout(cluster: Cluster) -> None:
    cluster.auto = False
    cluster.run_unit("web@1.service", M1)
    cluster.run_unit("web@2.service", M1)
    result = cluster.invoke("unload", "--no-block", "web@?")
    assert result.stdout == (
        "Triggered unit web@1.service unload\nTriggered unit web@2.service unload\n"
    )
    assert desired(cluster, "web@1.service") == desired(cluster, "web@2.service") == "inactive"
    result = fleetctl(cluster, "unload", "--block-attempts=1", "web@1", exit_code=1)
    assert result.stderr.endswith("Failed to unload units [web@1.service].\n")


def test_negative_block_attempts_is_a_usage_error(cluster: Cluster) -> None:
    fleetctl(cluster, "start", "--block-attempts=-1", "hello.service", exit_code=2)


# ---- the logic modules say nothing themselves ------------------------------------------------


def test_find_units_returns_what_matched_nothing_without_printing(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.add_unit("hello.service")

    async def go() -> Found:
        async with cluster.make_client(Settings()) as client:
            return await find_units(client, ["hello", "nope", "x*"])

    found = run(go())
    assert [u.name for u in found.units] == ["hello.service"]
    assert found.missing_lines() == ["Unit nope.service not found", "No unit matches x*"]
    assert capsys.readouterr() == ("", "")


def test_wait_for_states_hands_its_lines_to_the_callbacks(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.reactions["db.service"] = Reaction(reason=REASON, delay=0, placed_after=0.05)
    cluster.add_unit("db.service")
    said: list[tuple[str, str]] = []

    async def go() -> dict[str, str]:
        async with cluster.make_client(Settings()) as client:
            await client.set_target_state("db.service", TargetState.LAUNCHED)
            return await wait_for_states(
                client,
                ["db.service"],
                TargetState.LAUNCHED,
                0,
                MachineCache(client),
                say=lambda line: said.append(("out", line)),
                warn=lambda line: said.append(("err", line)),
            )

    assert run(go()) == {}
    assert said == [
        ("err", f"Unit db.service cannot be placed: {REASON}"),
        ("out", f"Unit db.service launched {ON_M1}"),
    ]
    assert capsys.readouterr() == ("", "")
