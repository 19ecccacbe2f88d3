"""Admission control without a server (gateway/service/admission.py): counted calls, the
in-flight budgets (a call alone always admitted), the turn to be read, and Triton readiness.
The gateway-level behaviour (a refused call's message is never read) is in
tests/test_reliability_gateway.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.service.admission import Admission, AdmissionLimits
from gateway.service.options import MIB, AdmissionError


def admission(**overrides) -> Admission:
    limits = dict(max_transcribes=2, max_streams=1, max_receiving=1, receive_wait_s=0.05,
                  max_request_bytes_in_flight=10 * MIB, max_audio_in_flight_s=60.0, retry_after_s=1.5)
    ready = Admission(AdmissionLimits(**{**limits, **overrides}))
    ready.triton_ready = True
    return ready


def test_calls_past_the_limit_are_refused_and_counted_back():
    gate = admission()
    with gate.call("Transcribe"), gate.call("Transcribe"):
        with pytest.raises(AdmissionError) as refused:
            with gate.call("Transcribe"):
                pass
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 Transcribe calls" in str(refused.value) and "retry after 1.5 s" in str(refused.value)
        with gate.call("StreamingRecognize"), gate.call("AnalyzeTicket"), gate.call("AnalyzeTicket"):
            pass  # streams have their own limit; small RPCs are not counted
    assert gate.running == {"Transcribe": 0, "StreamingRecognize": 0}
    with gate.call("Transcribe"):  # the slots came back
        pass


def test_a_call_that_fails_gives_its_slot_back():
    gate = admission(max_transcribes=1)
    with pytest.raises(ValueError):
        with gate.call("Transcribe"):
            raise ValueError("the handler failed")
    with gate.call("Transcribe"):
        pass


def test_triton_not_ready_refuses_only_what_needs_it():
    gate = admission()
    gate.triton_ready = False
    for rpc in ("Transcribe", "StreamingRecognize"):
        with pytest.raises(AdmissionError) as refused:
            with gate.call(rpc):
                pass
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    with gate.call("AnalyzeTicket"):  # ticket analysis does not use Triton
        pass


def test_request_bytes_budget_admits_a_call_alone_whatever_its_size():
    gate = admission(max_request_bytes_in_flight=10 * MIB)
    with gate.holding_request(64 * MIB):  # alone: admitted (the per-call limit bounds it)
        with pytest.raises(AdmissionError) as refused:
            with gate.holding_request(1):
                pass
        assert "64.0 MiB of requests in flight" in str(refused.value)
    with gate.holding_request(6 * MIB), gate.holding_request(4 * MIB):
        with pytest.raises(AdmissionError):
            with gate.holding_request(1):
                pass
    assert gate.request_bytes == 0


def test_decoded_audio_budget():
    gate = admission(max_audio_in_flight_s=60.0)
    with gate.holding_audio(3600.0):
        with pytest.raises(AdmissionError) as refused:
            with gate.holding_audio(1.0):
                pass
        assert "3600 s of decoded audio" in str(refused.value)
    assert gate.audio_s == 0.0


def test_a_call_waits_its_turn_to_be_read_then_is_refused():
    async def scenario():
        gate = admission(max_receiving=1, receive_wait_s=0.05)
        async with gate.receiving():
            with pytest.raises(AdmissionError) as refused:
                async with gate.receiving():
                    pass
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "receiving 1 other requests" in str(refused.value)
        order = []

        async def reader(name: str, hold_s: float):
            async with gate.receiving():
                order.append(name)
                await asyncio.sleep(hold_s)

        await asyncio.gather(reader("first", 0.01), reader("second", 0.0))  # a short wait: admitted in turn
        assert order == ["first", "second"]

    asyncio.run(scenario())


@pytest.mark.parametrize("field", ["max_transcribes", "max_receiving", "receive_wait_s", "max_request_bytes_in_flight"])
def test_limits_are_validated(field):
    with pytest.raises(ValueError):
        admission(**{field: 0})


@pytest.mark.parametrize("steps_before_cancel", range(4))
def test_a_turn_granted_as_the_call_is_cancelled_ends_it_cancelled(steps_before_cancel):
    """A call cancelled in the loop steps around being handed its turn ends cancelled and gives
    the turn back (asyncio.wait_for in Python 3.11 returned the turn and dropped the cancel when
    both came in one step: the call went on reading a cancelled client's message)."""

    async def scenario():
        gate = admission(max_receiving=1, receive_wait_s=5.0)
        entered = []

        async def waiter():
            async with gate.receiving():
                entered.append(True)
                await asyncio.sleep(0.05)

        async with gate.receiving():
            task = asyncio.create_task(waiter())
            await asyncio.sleep(0.01)  # waiting for the turn
        for _ in range(steps_before_cancel):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled(), f"cancelled {steps_before_cancel} steps after the turn was given, it went on ({entered})"
        async with asyncio.timeout(1.0):
            async with gate.receiving():  # the turn came back
                pass

    asyncio.run(scenario())
