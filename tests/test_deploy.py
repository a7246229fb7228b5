"""deploy/: the Flex Template metadata is current, its parameters map back to the command's options, and
the Dataflow settings in deploy/dataflow.env give a job DataflowRunner accepts (built offline, not submitted)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import yaml
from apache_beam.options.pipeline_options import PipelineOptions

from lmc_audit.pipelines.audit import build_parser, bundled_sample_dir, run

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SAMPLE = bundled_sample_dir()


def _flex():
    spec = importlib.util.spec_from_file_location("flex_template", DEPLOY / "flex_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metadata_lists_every_option_and_is_current():
    flex = _flex()
    committed = json.loads((DEPLOY / "metadata.json").read_text())
    assert committed == flex.metadata(), "run: python deploy/flex_template.py metadata > deploy/metadata.json"
    names = {p["name"] for p in committed["parameters"]}
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in flex.SKIP:
            assert flex.param_name(action) in names
    assert all(p["helpText"] for p in committed["parameters"])


def test_parameters_become_run_options():
    argv = _flex().to_run_argv(["--input=gs://b/a/*.jsonl,gs://b/c/*.parquet", "--output=gs://b/out",
                                "--no_coding=true", "--incremental=false", "--chunk_bytes=4096",
                                "--runner=DataflowRunner", "--scoring_accelerator=type:nvidia-l4;count:1"])
    assert argv == ["--input", "gs://b/a/*.jsonl", "gs://b/c/*.parquet", "--output=gs://b/out", "--no-coding",
                    "--chunk-bytes=4096", "--runner=DataflowRunner", "--scoring-accelerator=type:nvidia-l4;count:1"]
    args, beam_args = build_parser().parse_known_args(argv)
    assert args.coding is False and args.chunk_bytes == 4096 and beam_args == ["--runner=DataflowRunner"]


def _dataflow_env() -> dict[str, str]:
    """deploy/dataflow.env's settings, as launch.sh sees them."""
    names = ("IMAGE GPU_SERVICE_OPTIONS GPU_EXPERIMENTS GPU_MACHINE RIGHT_FIT_ACCELERATOR RIGHT_FIT_EXPERIMENTS "
             "CPU_MACHINE")
    script = f"source {DEPLOY / 'dataflow.env'} && for n in {names}; do echo \"$n=${{!n}}\"; done"
    out = subprocess.run(["bash", "-c", script], env={**os.environ, "PROJECT": "my-project",
                                                      "BUCKET": "gs://lmc-audit-test"},
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def _dataflow_flags(env: dict[str, str], *extra: str) -> list[str]:
    # --dry_run: DataflowRunner translates and validates the whole job, then stops before any API call.
    return ["--runner=DataflowRunner", "--dry_run=True", "--project=my-project", "--region=us-central1",
            "--temp_location=gs://lmc-audit-test/temp", f"--sdk_container_image={env['IMAGE']}", *extra]


MODEL_STEPS = ("ScoreChunks", "ScoreReference", "ScoreConcatenations", "VerifyPayloads/Decode")


def _runs_a_model(name: str) -> bool:
    """Every step that runs a model: scoring, the reference model, NCD and payload verification."""
    return any(name == s or name.startswith(s + "/") or f"/{s}/" in name or name.endswith("/" + s)
               for s in MODEL_STEPS)


def test_dataflow_right_fitting_job_asks_for_a_gpu_exactly_where_a_model_runs(tmp_path):
    """The job graph Dataflow would get: GPU hint on every step that runs a model (scoring, reference,
    NCD, verification: a payload coded on a GPU decodes only on one) and on no other, the image
    everywhere, and the program returns once the job is built (as under a Flex Template launcher),
    writing nothing."""
    env = _dataflow_env()
    out = tmp_path / "out"
    flags = _dataflow_flags(env, f"--machine_type={env['CPU_MACHINE']}",
                            f"--experiments={env['RIGHT_FIT_EXPERIMENTS']}")
    pipeline = beam.Pipeline(options=PipelineOptions(flags))
    record = run(["--sample", "--output", str(out), "--quiet", "--reference-model", "bundled",
                  f"--scoring-accelerator={env['RIGHT_FIT_ACCELERATOR']}", *flags], test_pipeline=pipeline)
    assert record == {"submitted": True, "output": str(out)}
    assert not out.exists(), "a launcher must not write run.json or manifests: the job has not run"

    proto = pipeline.runner.job.proto_pipeline
    envs = proto.components.environments
    assert {e.urn for e in envs.values()} == {"beam:env:docker:v1"}
    assert all(env["IMAGE"].encode() in e.payload for e in envs.values())
    hinted, plain = set(), set()
    for t in proto.components.transforms.values():
        if t.environment_id:
            hints = envs[t.environment_id].resource_hints
            (hinted if "beam:resources:accelerator:v1" in hints else plain).add(t.unique_name)
            if t.unique_name in hinted:
                assert hints["beam:resources:accelerator:v1"] == env["RIGHT_FIT_ACCELERATOR"].encode()
    assert all(_runs_a_model(n) for n in hinted), sorted(n for n in hinted if not _runs_a_model(n))
    assert not any(_runs_a_model(n) for n in plain), sorted(n for n in plain if _runs_a_model(n))
    for step in MODEL_STEPS:
        assert any(step in n for n in hinted), f"no hinted step runs {step}"
    assert any(n.startswith("ReadCorpus/") for n in plain) and any(n.startswith("WriteManifests/") for n in plain)
    assert any(n.startswith("WriteRunRecord/") for n in plain)


def test_flex_template_launch_of_the_whole_gpu_job_builds_and_returns(tmp_path):
    """The launcher's path: template parameters -> flags -> a Dataflow job with GPU workers, built offline."""
    env = _dataflow_env()
    out = tmp_path / "out"
    params = [f"--input={SAMPLE}", f"--output={out}", "--incremental=true",
              *_dataflow_flags(env, f"--machine_type={env['GPU_MACHINE']}",
                               f"--experiments={env['GPU_EXPERIMENTS']}",
                               f"--dataflow_service_options={env['GPU_SERVICE_OPTIONS']}")]
    assert _flex().main(params) == 0
    assert not out.exists()


def _launch(tmp_path, *args: str, script: str = "launch.sh") -> list[str]:
    """Runs a deploy/ script with a `gcloud` on PATH that records its arguments (no cloud is reached)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "gcloud-args.json"
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT": "my-project",
           "BUCKET": "gs://lmc-audit-test", "SA": "scheduler@my-project.iam.gserviceaccount.com"}
    subprocess.run(["bash", str(DEPLOY / script), *args], env=env, check=True)
    return json.loads(record.read_text())


def _template_parameters(gcloud_args: list[str]) -> list[str]:
    """--parameters as the launcher passes them to flex_template.py: gcloud's ``^D^`` prefix sets the delimiter."""
    out = []
    for i, a in enumerate(gcloud_args):
        if a == "--parameters":
            value = gcloud_args[i + 1]
            delimiter = ","
            if value.startswith("^"):
                delimiter, value = value[1:].split("^", 1)
            out += [f"--{kv}" for kv in value.split(delimiter)]
    return out


def test_launch_script_passes_parameters_that_become_the_intended_run(tmp_path):
    env = _dataflow_env()
    args = _launch(tmp_path, "right-fit", "gs://corpus/a/*.jsonl.zst,gs://corpus/b/*.parquet", "gs://audits/c",
                   "incremental=true", "chunk_bytes=4096")
    assert args[:3] == ["dataflow", "flex-template", "run"]
    assert args[args.index("--worker-machine-type") + 1] == env["CPU_MACHINE"]
    assert args[args.index("--additional-experiments") + 1] == env["RIGHT_FIT_EXPERIMENTS"]
    params = _template_parameters(args)
    run_args, beam_args = build_parser().parse_known_args(_flex().to_run_argv(params))
    assert run_args.input == ["gs://corpus/a/*.jsonl.zst", "gs://corpus/b/*.parquet"]
    assert run_args.output == "gs://audits/c" and run_args.incremental and run_args.chunk_bytes == 4096
    assert run_args.scoring_accelerator == env["RIGHT_FIT_ACCELERATOR"]
    assert beam_args == [f"--sdk_container_image={env['IMAGE']}"]

    gpu = _launch(tmp_path, "gpu", "gs://corpus/*.jsonl", "gs://audits/d")
    assert gpu[gpu.index("--additional-experiments") + 1] == env["GPU_EXPERIMENTS"]
    run_args, beam_args = build_parser().parse_known_args(_flex().to_run_argv(_template_parameters(gpu)))
    assert run_args.scoring_accelerator is None
    assert f"--dataflow_service_options={env['GPU_SERVICE_OPTIONS']}" in beam_args


def test_nightly_schedule_posts_a_launch_request_for_an_incremental_right_fit_run(tmp_path):
    env = _dataflow_env()
    args = _launch(tmp_path, "gs://corpus/*.jsonl.gz", "gs://audits/corpus", script="schedule/cloud_scheduler.sh")
    assert args[:4] == ["scheduler", "jobs", "create", "http"]
    assert args[args.index("--uri") + 1].endswith("/locations/us-central1/flexTemplates:launch")
    body = json.loads(args[args.index("--message-body") + 1])["launchParameter"]
    assert body["environment"]["additionalExperiments"] == [env["RIGHT_FIT_EXPERIMENTS"]]
    params = [f"--{k}={v}" for k, v in body["parameters"].items()]
    run_args, beam_args = build_parser().parse_known_args(_flex().to_run_argv(params))
    assert run_args.incremental and run_args.input == ["gs://corpus/*.jsonl.gz"]
    assert run_args.scoring_accelerator == env["RIGHT_FIT_ACCELERATOR"]
    assert beam_args == [f"--sdk_container_image={env['IMAGE']}"]


def _literal_keyword(path: Path, call: str, keyword: str):
    """A keyword argument of a call in a file, read without importing it (Airflow is not installed here)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == call:
            return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == keyword)
    raise AssertionError(f"no {call}(...) in {path}")


def test_airflow_dag_launches_an_incremental_right_fit_run_with_valid_parameters():
    body = _literal_keyword(DEPLOY / "schedule" / "airflow_dag.py", "DataflowStartFlexTemplateOperator", "body")
    launch = body["launchParameter"]
    assert launch["environment"]["additionalExperiments"] == [_dataflow_env()["RIGHT_FIT_EXPERIMENTS"]]
    params = [f"--{k}={v}" for k, v in launch["parameters"].items()]
    run_args, beam_args = build_parser().parse_known_args(_flex().to_run_argv(params))
    assert run_args.incremental and run_args.scoring_accelerator.startswith("type:nvidia-l4;count:1")
    assert [a.split("=")[0] for a in beam_args] == ["--sdk_container_image"]


def test_kubernetes_cronjob_runs_a_valid_incremental_command_on_several_worker_processes():
    job = yaml.safe_load((DEPLOY / "schedule" / "cronjob.yaml").read_text())
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["lmc-audit", "run"]
    run_args, beam_args = build_parser().parse_known_args(container["args"])
    assert run_args.incremental and run_args.input[0].startswith("s3://") and run_args.output.startswith("s3://")
    options = PipelineOptions(beam_args).get_all_options()
    assert options["direct_running_mode"] == "multi_processing" and options["direct_num_workers"] == 8
