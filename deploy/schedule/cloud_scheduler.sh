#!/usr/bin/env bash
# A nightly incremental audit: Cloud Scheduler calls the Flex Template launch API.
#   PROJECT=... BUCKET=... SA=scheduler@PROJECT.iam.gserviceaccount.com deploy/schedule/cloud_scheduler.sh gs://corpus/*.jsonl.gz gs://audits/corpus
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/dataflow.env
input="$1" output="$2"
body=$(cat <<JSON
{"launchParameter": {
  "jobName": "lmc-audit-nightly",
  "containerSpecGcsPath": "${TEMPLATE}",
  "parameters": {"input": "${input}", "output": "${output}", "incremental": "true",
                 "scoring_accelerator": "${RIGHT_FIT_ACCELERATOR}", "sdk_container_image": "${IMAGE}"},
  "environment": {"machineType": "${CPU_MACHINE}", "additionalExperiments": ["${RIGHT_FIT_EXPERIMENTS}"],
                  "tempLocation": "${BUCKET}/temp",
                  "stagingLocation": "${BUCKET}/staging"}}}
JSON
)
gcloud scheduler jobs create http lmc-audit-nightly --project "$PROJECT" --location "$REGION" \
  --schedule "0 3 * * *" --time-zone "Etc/UTC" --http-method POST \
  --uri "https://dataflow.googleapis.com/v1b3/projects/${PROJECT}/locations/${REGION}/flexTemplates:launch" \
  --oauth-service-account-email "${SA:?set SA}" --message-body "$body"
