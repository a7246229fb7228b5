#!/usr/bin/env bash
# Build and push the worker/launcher images, then the Flex Template spec.
#   PROJECT=my-proj BUCKET=gs://my-bucket deploy/build_template.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/dataflow.env
docker build -f deploy/Dockerfile -t "$IMAGE" .
docker build -f deploy/Dockerfile.cpu -t "$IMAGE_CPU" .
docker push "$IMAGE"
docker push "$IMAGE_CPU"
python deploy/flex_template.py metadata > deploy/metadata.json
gcloud dataflow flex-template build "$TEMPLATE" \
  --image "$IMAGE" --sdk-language PYTHON --metadata-file deploy/metadata.json --project "$PROJECT"
echo "template: $TEMPLATE"
