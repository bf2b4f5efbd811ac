"""Memory the service holds: a finished job lets its volume go, and `--volume-budget-mb` bounds what is actually
held — stored volumes, volumes that queued or running jobs still use after a delete, and uploads in progress."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from citrusv_backend.server.jobs import DONE, Job, JobQueue
from citrusv_backend.server.volumes import VolumeStore
from citrusv_backend.volume.input.io import Volume
from service_helpers import server_memory, submit, upload, volume_payload, wait

MiB = 2**20


@pytest.mark.unit
def test_a_finished_job_keeps_its_result_not_its_volume():
    store, jobs = VolumeStore(budget_bytes=64 * MiB, ttl_s=60), JobQueue(max_queued=4, result_ttl_s=60)
    volume = Volume.from_ijk_to_ras(np.zeros((4, 64, 64), np.int16), np.eye(4))
    stored = store.add(volume)
    alive = weakref.ref(volume.voxels)
    job = Job(task="segment", runner=lambda _job, volume=volume: volume.voxels.sum(), volume_id=stored.id)
    jobs.submit(job)
    taken = jobs.take()
    jobs.finish(taken, DONE, result=taken.runner(taken))
    del volume, stored, taken
    store.delete(job.volume_id)
    gc.collect()
    assert jobs.get(job.id).result == 0, "the result is kept"
    assert alive() is None, "a finished job still holds the volume it worked on"
    assert store.stats()["used_bytes"] == 0


@pytest.mark.unit
def test_the_budget_counts_a_deleted_volume_while_a_job_holds_it():
    store = VolumeStore(budget_bytes=3 * MiB, ttl_s=60)
    first = store.add(Volume.from_ijk_to_ras(np.zeros((2, 512, 1024), np.uint8), np.eye(4)))    # 1 MiB
    release = store.hold(first)
    store.delete(first.id)
    store.add(Volume.from_ijk_to_ras(np.zeros((2, 512, 1024), np.uint8), np.eye(4)))            # 2 MiB held
    with pytest.raises(Exception, match="held by volumes that queued or running jobs still use") as refused:
        store.reserve(int(2.5 * MiB))
    assert refused.value.status_code == 503
    assert store.stats()["count"] == 1, "a refused reservation evicts nothing"
    release()
    release()  # idempotent
    assert store.stats()["used_bytes"] == 1 * MiB
    with store.reserve(int(2.5 * MiB)) as reservation:  # the unused volume makes room
        assert store.stats()["count"] == 0
        assert store.stats()["reserved_bytes"] == reservation.nbytes
    assert store.stats()["reserved_bytes"] == 0


@pytest.mark.service
def test_deleted_volumes_leave_the_server_memory(server, client):
    """4 x 64 MiB volumes uploaded, each used by a job, deleted: the server's resident memory comes back down
    (it stayed 256 MiB high when finished jobs held their volumes through their runners)."""
    voxels = np.zeros((128, 512, 512), np.int16)  # 64 MiB each; zeros compress to almost nothing on the wire
    payload = volume_payload(Volume.from_ijk_to_ras(voxels, np.eye(4)), name="big")
    del voxels

    def upload_and_use() -> str:
        response = client.post("/v1/volumes", json=payload)
        assert response.status_code == 201, response.text
        volume_id = response.json()["volume_id"]
        job = submit(client, volume_id, "ask", "What is this?", slice=64, max_new_tokens=1, min_pixels=784,
                     max_pixels=3136)
        assert wait(client, job)["status"] == "done"
        return volume_id

    for _ in range(2):  # warm-up: the worker thread's malloc arena and lazy imports reach their steady size
        client.delete(f"/v1/volumes/{upload_and_use()}")
    before = server_memory(server)["rss"]
    ids = [upload_and_use() for _ in range(4)]
    held = server_memory(server)["rss"] - before
    for volume_id in ids:
        assert client.delete(f"/v1/volumes/{volume_id}").status_code == 200
    after = server_memory(server)["rss"] - before
    assert held > 200 * MiB, f"the 4 volumes should be resident while stored ({held / MiB:.0f} MiB)"
    assert after < 64 * MiB, f"{after / MiB:.0f} MiB still held after the volumes were deleted"
    volumes = client.get("/v1/info").json()["volumes"]  # (other tests' volumes may still be stored)
    assert volumes["removed_in_use_bytes"] == 0 and volumes["reserved_bytes"] == 0
    assert all(client.get(f"/v1/volumes/{volume_id}").status_code == 404 for volume_id in ids)


@pytest.mark.service
def test_an_upload_waits_while_the_budget_is_held_by_a_job(limits_client, chest):
    """The limits server's budget is 3 MiB (one chest CT): a deleted volume that a queued or running job still
    uses keeps its memory, so a second upload is told to retry until that job has ended."""
    first = upload(limits_client, chest)
    job = submit(limits_client, first, "segment", "segment the left lung", mode="per-slice", max_new_tokens=2)
    assert limits_client.delete(f"/v1/volumes/{first}").status_code == 200
    refused = limits_client.post("/v1/volumes", json=volume_payload(chest))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "busy" and refused.headers["retry-after"]
    limits_client.delete(f"/v1/jobs/{job}")
    assert wait(limits_client, job)["status"] == "cancelled"
    assert limits_client.post("/v1/volumes", json=volume_payload(chest)).status_code == 201
