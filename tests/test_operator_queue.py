"""Concurrency slots: limit, creation order, release, adoption above the limit."""

from reparam.operator.queue import SlotQueue


def test_admits_up_to_limit_then_queues_in_order() -> None:
    q = SlotQueue(2)
    assert q.request("c", 3) == ["c"]
    assert q.request("a", 1) == ["a"]
    assert q.request("b", 2) == [] and not q.holds("b")
    assert q.request("d", 0) == [] and q.position("d") == 1 and q.position("b") == 2
    assert (q.running, q.waiting) == (2, 2)
    assert q.release("c") == ["d"]          # oldest waiter first
    assert q.release("zzz") == []           # unknown keys are harmless
    assert q.release("a") == ["b"]
    assert q.release("b") == [] and (q.running, q.waiting) == (1, 0)


def test_request_is_idempotent_and_keeps_place() -> None:
    q = SlotQueue(1)
    q.request("a", 1)
    q.request("b", 2)
    q.request("c", 3)
    q.request("c", 0)  # a re-run does not jump the queue
    assert q.position("b") == 1 and q.position("c") == 2
    assert q.request("a", 1) == [] and q.holds("a")


def test_occupy_above_limit_blocks_newcomers() -> None:
    q = SlotQueue(1)
    q.occupy("x")
    q.occupy("y")  # adopted running Jobs after a restart
    assert q.running == 2 and q.request("z", 1) == []
    assert q.release("x") == []  # still 1 running == limit
    assert q.release("y") == ["z"]


def test_waiting_key_leaves_queue_on_release_and_limit_raise() -> None:
    q = SlotQueue(1)
    q.request("a", 1)
    q.request("b", 2)
    q.request("c", 3)
    assert q.release("b") == [] and q.position("c") == 1
    assert q.set_limit(3) == ["c"]
