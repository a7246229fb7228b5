"""The run record is built inside the job from PCollections: counts of what was read and verified."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from lmc_audit.pipelines import run_record
from lmc_audit.pipelines.run_record import SummarizeVerification


def test_verification_summary_counts_and_names_failures_in_order():
    results = [(f"chunk {i}", i % 7 != 3) for i in range(50)]
    failed = sorted(name for name, ok in results if not ok)
    with TestPipeline() as p:
        summary = (p | beam.Create(results, reshuffle=True)
                   | beam.CombineGlobally(SummarizeVerification()))
        assert_that(summary, equal_to([{"verified": 50 - len(failed), "verification_failed": len(failed),
                                        "failed_chunks": failed}]))


def test_verification_summary_keeps_the_first_names_only(monkeypatch):
    monkeypatch.setattr(run_record, "MAX_FAILED_NAMES", 3)
    fn = SummarizeVerification()
    accs = [fn.create_accumulator(), fn.create_accumulator()]
    for i, name in enumerate(["e", "a", "d", "b", "c"]):
        accs[i % 2] = fn.add_input(accs[i % 2], (name, False))
    out = fn.extract_output(fn.merge_accumulators(accs))
    assert out == {"verified": 0, "verification_failed": 5, "failed_chunks": ["a", "b", "c"]}
