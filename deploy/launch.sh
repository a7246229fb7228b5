#!/usr/bin/env bash
# Launch an audit on Dataflow from the Flex Template.
#   PROJECT=my-proj BUCKET=gs://my-bucket deploy/launch.sh gpu|right-fit|cpu INPUT_GLOB OUTPUT [name=value ...]
# Extra name=value pairs are template parameters (see deploy/metadata.json), e.g. incremental=true.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/dataflow.env
mode="$1" input="$2" output="$3"; shift 3
image="$IMAGE"
if [ "$mode" = cpu ]; then image="$IMAGE_CPU"; fi
# Parameters are joined with "~" (gcloud's ^~^ delimiter syntax), so values may hold commas,
# e.g. several input globs: 'gs://a/*.jsonl,gs://b/*.parquet'.
params="input=${input}~output=${output}~sdk_container_image=${image}"
for kv in "$@"; do params="${params}~${kv}"; done
case "$mode" in
  gpu)       extra=(--worker-machine-type "$GPU_MACHINE" --additional-experiments "$GPU_EXPERIMENTS")
             params="${params}~dataflow_service_options=${GPU_SERVICE_OPTIONS}" ;;
  right-fit) extra=(--worker-machine-type "$CPU_MACHINE" --additional-experiments "$RIGHT_FIT_EXPERIMENTS")
             params="${params}~scoring_accelerator=${RIGHT_FIT_ACCELERATOR}" ;;
  cpu)       extra=(--worker-machine-type "$CPU_MACHINE") ;;
  *) echo "mode must be gpu, right-fit or cpu" >&2; exit 2 ;;
esac
gcloud dataflow flex-template run "lmc-audit-$(date -u +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" --template-file-gcs-location "$TEMPLATE" \
  --staging-location "${BUCKET}/staging" --temp-location "${BUCKET}/temp" \
  --parameters "^~^${params}" "${extra[@]}"
