"""``load-sample-data --pacs``: the sample radiograph stored in a real Orthanc and named in FHIR, once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from pacs import Pacs
from support import FhirServer

from cds_service.sample_pacs import dicomweb_root_of


def test_the_sample_study_is_stored_in_the_pacs_and_named_in_fhir_once(
    fhir_server: FhirServer, pacs: Pacs
) -> None:
    user, password = pacs.user
    with_user = pacs.url.replace("http://", f"http://{user}:{password}@")
    assert dicomweb_root_of(with_user) == pacs.dicomweb
    command = [str(Path(sys.executable).parent / "medgemma-cds"), "load-sample-data"]
    command += ["--fhir-base", fhir_server.base_url, "--token", fhir_server.token, "--pacs", with_user]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "sample PACS study: stored in the PACS" in first.stdout, first.stdout + first.stderr
    assert "sample PACS study: already loaded" in second.stdout
    # The password never reaches the output.
    assert password not in first.stdout + first.stderr

    uid = "1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818"
    (study,) = fhir_server.search(f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}")
    endpoint = fhir_server.get(study["endpoint"][0]["reference"])
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == pacs.dicomweb
    (instance,) = study["series"][0]["instance"]
    assert instance["uid"] == "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    patient = fhir_server.get(study["subject"]["reference"])
    assert patient["identifier"][0]["system"] == "urn:medgemma-cds:sample-pacs-patient"
    # The PACS holds the study under the UID FHIR names, over DICOMweb.
    metadata = httpx.get(
        f"{pacs.dicomweb}/studies/{uid}/metadata", headers={"Authorization": pacs.authorization}
    ).json()
    assert [m["00080018"]["Value"][0] for m in metadata] == [instance["uid"]]
