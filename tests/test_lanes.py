"""The suite's own scheduling (tests/lanes.py): whole modules, the waiting ones on the first worker's lane."""

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

from tests.lanes import WAITING, WaitingLane

MODULES = ["tests/test_gangs.py", "tests/test_fleet.py", "tests/test_job.py", "tests/test_faults.py",
           "tests/test_kinds.py"]


class _Worker:
    """What the scheduler sees of an xdist worker: its id, and the tests it was sent."""

    def __init__(self, name: str):
        self.gateway, self.shutting_down, self.sent = SimpleNamespace(id=name), False, []

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.sent.extend(indexes)


def _scheduler(workers: list[_Worker]) -> WaitingLane:
    """A scheduler whose workers collected two tests of each of `MODULES`, in that order."""
    sched = WaitingLane(SimpleNamespace(getvalue={"tx": [f"{len(workers)}*popen"]}.get))  # `-n N`, as xdist spells it
    collection = [f"{module}::test_{i}" for module in MODULES for i in range(2)]
    for worker in workers:
        sched.assigned_work[worker] = {}
        sched.registered_collections[worker] = collection
    sched.collection = collection
    sched.workqueue = OrderedDict((m, {f"{m}::test_{i}": False for i in range(2)}) for m in MODULES)
    return sched


def _modules(sched: WaitingLane, worker: _Worker) -> list[str]:
    return [sched.collection[i].split("::")[0] for i in worker.sent[::2]]


def test_the_first_of_three_workers_takes_the_waiting_modules_and_each_lane_the_others_once_its_own_is_empty():
    assert {"tests/test_fleet.py", "tests/test_faults.py"} <= WAITING and not WAITING & {MODULES[0], *MODULES[2::2]}
    lane, a, b = _Worker("gw0"), _Worker("gw1"), _Worker("gw2")
    sched = _scheduler([b, lane, a])  # the lane is the first by id, whatever the order they joined
    for worker in (a, lane, lane, lane, b):
        sched._assign_work_unit(worker)
    # Its own modules in collection order, then the others' next one; the others never take a waiting one first.
    assert _modules(sched, lane) == ["tests/test_fleet.py", "tests/test_faults.py", "tests/test_job.py"]
    assert (_modules(sched, a), _modules(sched, b)) == (["tests/test_gangs.py"], ["tests/test_kinds.py"])
    assert not sched.workqueue  # whole modules, each sent once

    lane, a, b = _Worker("gw0"), _Worker("gw1"), _Worker("gw2")
    sched = _scheduler([lane, a, b])
    for worker in (a, a, a, b):
        sched._assign_work_unit(worker)
    assert _modules(sched, a) == ["tests/test_gangs.py", "tests/test_job.py", "tests/test_kinds.py"]
    assert _modules(sched, b) == ["tests/test_fleet.py"] and not lane.sent  # a took all of b's lane: b takes the lane's next


def test_every_waiting_module_exists():
    """A renamed module would silently leave the lane: the list names files that are there."""
    root = Path(__file__).resolve().parents[1]
    assert WAITING and all((root / module).is_file() for module in WAITING)


def test_with_two_workers_it_is_plain_loadfile():
    workers = [_Worker("gw0"), _Worker("gw1")]
    sched = _scheduler(workers)
    for worker in (*workers, *workers, workers[0]):
        sched._assign_work_unit(worker)
    assert _modules(sched, workers[0]) == MODULES[0::2] and _modules(sched, workers[1]) == MODULES[1::2]
