"""The async stream's bookkeeping: an interrupted sample continued under new weights is one sample again, each
token tagged with the version that sampled it, a group's age is its oldest token's, and DAPO's refills stay
within their bound."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from rlhf_ray.controller.rollout_stream import RolloutStream, StreamedGroup, _Group, _Sample
from rlhf_ray.engines.rollout_engine import StreamPiece


def _piece(tokens: list[int], text: str, finish: str | None) -> StreamPiece:
    return StreamPiece("g0s0", np.asarray(tokens, dtype=np.int64), -0.5 * np.arange(1, len(tokens) + 1, dtype=np.float32),
                       text, finish)


def test_an_interrupted_sample_is_stitched_with_the_version_of_each_token():
    sample = _Sample(engine=0)
    sample.add(_piece([5, 6], "ab", None), version=3)   # interrupted by the sync to version 4
    sample.add(_piece([7], "c", "stop"), version=4)     # continued from prompt + [5, 6] under version 4
    other = _Sample(engine=0)
    other.add(_piece([9], "z", "length"), version=4)
    group = _Group(gid=0, prompt=2, samples=[sample, other])
    assert group.done() and sample.pieces == 2 and sample.length == 3
    gens = group.generations()
    assert [t.tolist() for t in gens.token_ids] == [[5, 6, 7], [9]]
    assert [lp.tolist() for lp in gens.logprobs] == [[-0.5, -1.0, -0.5], [-0.5]]
    assert gens.texts == ["abc", "z"] and gens.finish_reasons == ["stop", "length"]
    assert gens.prompt_index.tolist() == [0, 0]
    versions = [np.concatenate(s.versions) for s in group.samples]
    assert [v.tolist() for v in versions] == [[3, 3, 4], [4]]
    scored = StreamedGroup(0, 2, gens, versions, rewards=None, parts={})  # type: ignore
    assert scored.oldest() == 3  # at policy version 5 it is 2 versions old: over max_staleness 1, dropped


def test_a_sample_still_in_flight_leaves_its_group_unfinished():
    running, done = _Sample(engine=0), _Sample(engine=0)
    running.add(_piece([5], "a", None), version=0)
    done.add(_piece([6], "b", "stop"), version=0)
    assert not _Group(gid=1, prompt=0, samples=[running, done]).done()


def _scored(gid: int, rewards: list[float]) -> StreamedGroup:
    gens = _Group(gid, 0, [_Sample(engine=0)]).generations()
    return StreamedGroup(gid, gid, gens, [np.zeros(1, dtype=np.int64)] * len(rewards), torch.tensor(rewards), {})


def test_filter_groups_refills_flat_groups_within_max_filter_rounds_step_batches_per_step():
    """algo.filter_groups in async mode: a scored group whose rewards are all equal is dropped and one more prompt
    may start (admission + 1), until max_filter_rounds (1) x prompts_per_step (2) x steps admitted (1 at version 0,
    max_staleness 0) refills; past that such a group is queued as a top-up, and a step counts both."""
    stream = RolloutStream(SimpleNamespace(num_engines=1), None, None, None, None, 0, prompts_per_step=2,  # type: ignore
                           total_steps=10, max_staleness=0, partial=False, seed_of=None, timeout_s=5.0,  # type: ignore
                           refill_rounds=1)
    stream.admitted = 2  # step 1's two groups started
    assert stream._admissible() == 0
    assert not stream._refill(_scored(0, [1.0, 0.0]))      # rewards differ: kept
    assert stream._refill(_scored(1, [0.0, 0.0]))          # flat: dropped, one more may start
    assert stream._admissible() == 1
    assert stream._refill(_scored(2, [1.0, 1.0])) and stream._admissible() == 2
    topped = _scored(3, [0.0, 0.0])
    assert not stream._refill(topped) and topped.flat      # the bound (2) reached: queued as it is
    stream.ready = [_scored(0, [1.0, 0.0]), topped]
    groups, numbers = stream.take(0, push=lambda: {"seconds": 0.0, "bytes": 0.0})
    assert [g.gid for g in groups] == [0, 3]
    assert (numbers["filter/kept_groups"], numbers["filter/topped_up_groups"], numbers["filter/dropped_groups"]) == (1, 1, 2)
    stream.publish(1)  # version 1: two steps admitted, the bound is 4
    assert stream._refill(_scored(4, [0.0, 0.0])) and stream.refilled == 3
