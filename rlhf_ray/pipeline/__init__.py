"""``rlhf-ray pipeline PIPELINE.yaml``: named stages (any job, eval too) run in order, each reading earlier stages'
outputs by reference (``model.path: ${sft.final}``), gates after a stage that stop the pipeline with what failed
and why, and a state file that makes a rerun skip what is done and resume what was interrupted.

``spec``: the file -> ``PipelineSpec`` (every check at load time); ``refs``: the ``${stage.output}`` references;
``gates``: the checks on a stage's numbers (pure); ``state``: ``pipeline_state.json``; ``run``: the run itself.
The pipeline's report page is ``rlhf_ray.report.pipeline_page``.
"""

from rlhf_ray.pipeline.spec import PipelineError, PipelineSpec, StageSpec, load_pipeline

__all__ = ["PipelineError", "PipelineSpec", "StageSpec", "load_pipeline"]
