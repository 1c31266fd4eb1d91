"""The load board (a real shared file mapped twice) and the stuck-request watch."""

import asyncio
import logging
import os
import socket
import threading
import time

import pytest

from unitgen_worker import balance as balance_module
from unitgen_worker import board as board_module
from unitgen_worker.balance import FRESH, Balancer
from unitgen_worker.board import DRAINING, FULL, OVER_SHARE, Board, Siblings
from unitgen_worker.hung import HungRequests, Running, WatchThreads


def test_siblings_see_each_other_and_skip_stale_and_draining_slots(tmp_path, monkeypatch):
    path = tmp_path / "board"
    me, other, third = Board(path, 0), Board(path, 5), Board(path, 2)
    other.pid, third.pid = me.pid + 1, me.pid + 2  # as if other processes held them
    assert me.siblings() == Siblings()  # nobody has published yet
    me.publish(connections=9, in_flight=1)
    other.publish(connections=4, in_flight=0)
    third.publish(connections=7, in_flight=2)
    assert me.siblings() == Siblings(count=2, connections=11, accepting=2, accepted={other.pid: 0, third.pid: 0},
                                    pids=frozenset({other.pid, third.pid}))
    other.publish(connections=4, in_flight=0, flags=FULL)
    third.publish(connections=7, in_flight=2, flags=OVER_SHARE)
    # Alive, but not accepting.
    assert me.siblings() == Siblings(count=2, connections=11, accepting=0, accepted={third.pid: 0},
                                    pids=frozenset({other.pid, third.pid}))
    third.publish(connections=7, in_flight=2, flags=DRAINING)
    assert me.siblings() == Siblings(count=1, connections=4, accepting=0, draining=1, accepted={},
                                    pids=frozenset({other.pid}))
    now = time.monotonic()
    monkeypatch.setattr(board_module.time, "monotonic", lambda: now + board_module.STALE + 0.1)
    assert me.siblings() == Siblings()  # a heartbeat that stopped: dead, or its loop is stuck
    monkeypatch.undo()
    other.leave()
    assert me.siblings() == Siblings(draining=1)  # the third, draining
    third.leave()
    assert me.siblings() == Siblings()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_accepted_counts_of_siblings_that_count_them_and_are_not_full(tmp_path):
    path = tmp_path / "board"
    me, other, third = Board(path, 0), Board(path, 1), Board(path, 2)
    other.pid, third.pid = me.pid + 1, me.pid + 2
    other.publish(connections=2, in_flight=0, accepted=900)
    third.publish(connections=2, in_flight=0, accepted=1100)
    other.count_accepted(950)  # between heartbeats
    assert me.siblings() == Siblings(count=2, connections=4, accepting=2, accepted={other.pid: 950, third.pid: 1100},
                                    pids=frozenset({other.pid, third.pid}))
    third.publish(connections=2, in_flight=2, flags=FULL, accepted=1100)
    assert me.siblings() == Siblings(count=2, connections=4, accepting=1, accepted={other.pid: 950},
                                    pids=frozenset({other.pid, third.pid}))
    # A worker from before the count (during a roll) writes zeros there and no COUNTS flag.
    board_module._SLOT.pack_into(third._map, third._offset, third.pid, 2, 0, 0, time.monotonic(), 0)
    assert me.siblings().accepted == {other.pid: 950}


def test_an_instance_ahead_on_accepts_stops_accepting_until_its_sibling_catches_up(tmp_path):
    path = tmp_path / "board"
    sibling = Board(path, 1)
    sibling.pid = os.getpid() + 1

    async def scenario():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            me = Balancer([listener], asyncio.Protocol, [], board=Board(path, 0), capacity=0, busy=lambda: 0,
                          rebalance=True, backlog=16)
            await me.start()
            sibling.publish(connections=0, in_flight=0, accepted=0)
            for _ in range(me._accepts.maxlen - 1):  # a second of ticks, with nothing accepted
                me._accepts.append(({sibling.pid: 0}, 0))
            me.accepted = 200  # against the sibling's 100: 50 over the mean of 150
            sibling.count_accepted(100)
            me._share_accepts()
            assert not me.ahead  # not a whole window yet: a new instance takes what comes
            me._accepts.append(({sibling.pid: 0}, 0))
            me._share_accepts()
            assert me.ahead and me.churning
            await asyncio.sleep(FRESH)
            assert me._servers == [] and me._should_accept() is False
            sibling.publish(connections=0, in_flight=0, accepted=196)  # 2 over the mean: within half the slack
            await asyncio.sleep(3 * FRESH)
            assert not me.ahead and me._servers
            # A full sibling's few accepts are no share to meet.
            sibling.publish(connections=0, in_flight=4, flags=board_module.FULL, accepted=10)
            me._share_accepts()
            assert not me.ahead
            await me.stop()
            me.leave()

    asyncio.run(scenario())


def test_an_instance_over_its_share_accepts_again_as_soon_as_its_connections_close(tmp_path):
    """Short-lived connections: no request hook tells it they closed, nor may it wait for
    its tick (a roll under connection-close load lost a fifth of its throughput so)."""
    path = tmp_path / "board"
    sibling = Board(path, 1)
    sibling.pid = os.getpid() + 1

    async def scenario():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            connections = {object() for _ in range(4)}
            me = Balancer([listener], asyncio.Protocol, connections, board=Board(path, 0), capacity=0,
                          busy=lambda: 0, rebalance=True, backlog=16)
            await me.start()
            me._tick.cancel()  # only what the connections do may wake it here
            sibling.publish(connections=0, in_flight=0)
            me._look_at_the_board()  # as a tick does: its fair share
            await asyncio.sleep(FRESH)
            me._check_share(arriving=1)  # 5 against an idle sibling: over the mean of 2.5
            assert me.over_share
            # A tick ends it and the next arrival starts it again before the first look ran:
            # still one look pending, not two chains of them.
            pending = me._looking_again
            me.over_share = False
            me._check_share(arriving=1)
            assert me.over_share and me._looking_again is pending
            await asyncio.sleep(2 * FRESH)
            assert me._servers == []
            connections.clear()  # closed by their clients, which went on to the sibling
            sibling.publish(connections=4, in_flight=0)
            await asyncio.sleep(3 * FRESH)  # well under a tick
            assert not me.over_share and me._servers
            await me.stop()
            me.leave()

    asyncio.run(scenario())


def test_a_claim_lost_to_a_sibling_starting_together_is_made_again(tmp_path):
    path = tmp_path / "board"
    me, far = Board(path, 0), Board(path, 7)
    far.pid = me.pid + 1
    board_module._HEADER.pack_into(far._map, 0, 4)  # slot 3's claim overwrote slot 7's
    far.publish(connections=3, in_flight=0)
    assert me.siblings() == Siblings()
    far.claim()
    assert me.siblings() == Siblings(count=1, connections=3, accepting=1, accepted={far.pid: 0},
                                    pids=frozenset({far.pid}))


def test_the_board_refuses_a_link_and_instances_without_a_slot(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / "board").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        Board(tmp_path / "board", 0)
    with pytest.raises(ValueError):
        Board(tmp_path / "other", 1024)


def test_threads_stuck_past_the_timeout_are_logged_with_their_stack_and_recycle(caplog):
    release = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/hang":
            release.wait(10)
        start_response("200 OK", [])
        return [b"ok"]

    watch = WatchThreads(app, threads=2)
    hung = HungRequests(0.2, watch)

    def call(path):
        list(watch({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None))

    call("/fast")
    assert watch.busy() == 0
    stuck = [threading.Thread(target=call, args=("/hang",)) for _ in range(2)]
    for thread in stuck:
        thread.start()
    time.sleep(0.05)
    assert watch.busy() == 2 and hung.stuck() == 0 and not hung.check()
    time.sleep(0.3)
    with caplog.at_level(logging.ERROR, logger="unitgen.worker"):
        assert hung.check()  # both threads stuck: recycle
        assert hung.running_unstuck() == 0
    assert len(caplog.records) == 2  # once each, however often it looks
    assert "request 'GET' '/hang' has run for 0 s in thread" in caplog.records[0].getMessage()
    assert "in app\n    release.wait(10)" in caplog.records[0].getMessage()
    release.set()
    for thread in stuck:
        thread.join()
    assert watch.busy() == 0 and not hung.check()


def test_a_request_timeout_of_zero_never_reports():
    watch = WatchThreads(lambda environ, start_response: [], threads=1)
    running = watch.running[1] = Running("GET", "/")
    running.started = running.since = 0.0  # running since boot
    assert HungRequests(0, watch).stuck() == 0 and not HungRequests(0, watch).check()


def test_time_waiting_for_the_client_is_not_the_apps():
    class SlowClient:
        def read(self, size=-1):
            time.sleep(0.5)  # a slow upload
            return b"body"

    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        yield b"a"
        yield b"b"

    watch = WatchThreads(app, threads=1)
    hung = HungRequests(0.2, watch)
    chunks = iter(watch({"REQUEST_METHOD": "POST", "PATH_INFO": "/up", "wsgi.input": SlowClient()}, lambda *a: None))
    reading = threading.Thread(target=lambda: next(chunks))
    reading.start()
    time.sleep(0.35)
    assert watch.busy() == 1 and hung.stuck() == 0  # 0.35 s in, all of it reading the body
    reading.join()
    time.sleep(0.35)  # the first chunk handed over, the client slow to take it
    assert hung.stuck() == 0 and not hung.check()
    assert list(chunks) == [b"b"] and watch.busy() == 0


def test_no_client_is_asked_to_move_until_a_sibling_that_came_has_settled(tmp_path, monkeypatch):
    """An instance swapping shows on the board with no connection while its old process's
    clients are about to reconnect: its sibling must not send half its own clients after
    them (a reload of 1 of 2 under 64 keep-alive connections: 67 reconnects for 31)."""
    path = tmp_path / "board"
    sibling = Board(path, 1)
    # Instance 1's process and its open connections, published by a heartbeat.
    holder = {"pid": os.getpid() + 1, "connections": 32}  # its old process, as many as this one
    monkeypatch.setattr(balance_module, "TICK", 0.01)

    class Http:  # what uvicorn's HTTP protocol offers the Balancer: the app it runs next
        app = None

    async def heartbeat():
        while True:
            sibling.pid = holder["pid"]
            sibling.publish(connections=holder["connections"], in_flight=0)
            await asyncio.sleep(0.01)

    async def scenario():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            connections = {Http() for _ in range(32)}
            me = Balancer([listener], asyncio.Protocol, connections, board=Board(path, 0), capacity=0,
                          busy=lambda: 0, rebalance=True, backlog=16, http_protocol=Http)
            beat = asyncio.get_running_loop().create_task(heartbeat())
            await asyncio.sleep(0.02)
            await me.start()
            await asyncio.sleep(balance_module.SETTLE + 0.1)
            assert not me._moving  # even: nobody moves
            # Its new process: none of the old one's clients yet.
            holder.update(pid=os.getpid() + 2, connections=0)
            await asyncio.sleep(balance_module.SETTLE / 2)
            assert not me._moving and not me._servers  # over its share: accepting none, moving none
            await asyncio.sleep(balance_module.SETTLE / 2 + 0.1)
            # Settled, and the clients did not come back to instance 1: now some move there.
            assert len(me._moving) == 32 - 17
            beat.cancel()
            await me.stop()
            me.leave()

    asyncio.run(scenario())


def test_a_client_told_to_move_counts_as_this_instances_until_a_sibling_can_show_it(tmp_path, monkeypatch):
    """8 connections against a sibling's 0: 3 are over the share. The first of them to
    leave must not make the instance ask a 4th before the board can show where it went
    (CI: 4 told to close where 3 were over)."""
    path = tmp_path / "board"
    sibling = Board(path, 1)
    sibling.pid = os.getpid() + 1  # another process, as the board sees it
    for name, value in (("TICK", 0.01), ("SETTLE", 0.05), ("TRANSIT", 0.3)):
        monkeypatch.setattr(balance_module, name, value)

    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    class Http:  # what uvicorn's HTTP protocol offers the Balancer: the app it runs next
        app = staticmethod(answer)

    async def scenario():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            connections = {Http() for _ in range(8)}
            me = Balancer([listener], asyncio.Protocol, connections, board=Board(path, 0), capacity=0,
                          busy=lambda: 0, rebalance=True, backlog=16, http_protocol=Http)

            def asked() -> list[Http]:
                return [connection for connection in connections if connection in me._moving]

            sibling.publish(connections=0, in_flight=0)
            await me.start()
            for _ in range(20):  # settled, and the ticks went on (the sibling's heartbeat too)
                sibling.publish(connections=0, in_flight=0)
                await asyncio.sleep(0.01)
            assert len(asked()) == 3  # mean 4, limit 4 + 1
            told, headers = asked()[0], []
            await told.app({"type": "http"}, None, lambda message: asyncio.sleep(0, headers.append(message)))
            assert headers[0]["headers"] == [(b"connection", b"close")]
            connections.discard(told)  # uvicorn closes it; the sibling has yet to publish it
            for _ in range(10):
                sibling.publish(connections=0, in_flight=0)
                await asyncio.sleep(0.01)
            assert len(asked()) == 2  # still 8 here for the share: nobody else asked
            await asyncio.sleep(balance_module.TRANSIT)
            # Never showed at the sibling: 7 against 0 is 1 over now (limit 3.5 + 1).
            assert len(asked()) == 3
            await me.stop()
            me.leave()

    asyncio.run(scenario())
