"""Airflow DAG: a nightly incremental lmc-audit run on Dataflow from the Flex Template.

Needs ``apache-airflow-providers-google``. Set the Airflow Variables
``lmc_audit_project``, ``lmc_audit_region``, ``lmc_audit_template`` (the gs://
path written by deploy/build_template.sh), ``lmc_audit_image``,
``lmc_audit_bucket``, ``lmc_audit_input`` and ``lmc_audit_output``.
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

with DAG("lmc_audit_nightly", schedule="0 3 * * *", start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, max_active_runs=1, tags=["lmc-audit"]) as dag:
    DataflowStartFlexTemplateOperator(
        task_id="audit",
        project_id="{{ var.value.lmc_audit_project }}",
        location="{{ var.value.lmc_audit_region }}",
        wait_until_finished=True,
        body={"launchParameter": {
            "jobName": "lmc-audit-{{ ds_nodash }}",
            "containerSpecGcsPath": "{{ var.value.lmc_audit_template }}",
            "parameters": {
                "input": "{{ var.value.lmc_audit_input }}",
                "output": "{{ var.value.lmc_audit_output }}",
                "incremental": "true",  # unchanged shards are kept, a killed run resumes
                "scoring_accelerator": "type:nvidia-l4;count:1;install-nvidia-driver",
                "sdk_container_image": "{{ var.value.lmc_audit_image }}",
            },
            # One SDK process (one model copy) per VM: see deploy/dataflow.env.
            "environment": {"machineType": "n2-standard-8", "additionalExperiments": ["no_use_multiple_sdk_containers"],
                            "tempLocation": "{{ var.value.lmc_audit_bucket }}/temp"},
        }},
    )
