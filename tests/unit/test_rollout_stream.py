"""The async stream's bookkeeping: an interrupted sample continued under new weights is one sample again, each
token tagged with the version that sampled it, and a group's age is its oldest token's."""

from __future__ import annotations

import numpy as np

from rlhf_ray.controller.rollout_stream import StreamedGroup, _Group, _Sample
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
