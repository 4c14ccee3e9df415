"""The moto server the AWS tests rely on is a real HTTP endpoint boto3 can use."""

from __future__ import annotations

import os

import boto3

from shopmesh.awsstub import moto_server


def test_boto3_talks_to_moto_over_http() -> None:
    with moto_server() as server:
        kms = boto3.client("kms", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        key_id = kms.create_key(Description="probe")["KeyMetadata"]["KeyId"]
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
        pid = server.pid
    # Stopped by its own pid.
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
