"""Documents: queue them for learning, follow what became of them, and forget them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException

from service.auth import Access
from service.deps import GUARDED, Admin, DocIdPath, Svc, Tracker, Writer, problems
from service.documents import DocumentRecord, DocumentStore, IdConflict
from service.schemas import (
    DocumentAccepted,
    DocumentBatchIn,
    DocumentIn,
    DocumentOut,
    DocumentsAccepted,
    DocumentsIn,
    Operation,
)
from service.settings import Settings

router = APIRouter()


@router.post(
    "/v1/documents",
    status_code=202,
    response_model=DocumentAccepted | DocumentsAccepted,
    responses=problems(*GUARDED, 409, 413, 503),
    summary="Queue one document, or a batch as {documents: [...]}",
)
def post_documents(
    s: Svc, body: Annotated[DocumentsIn, Body()], access: Writer
) -> DocumentAccepted | DocumentsAccepted:
    batch = body.documents if isinstance(body, DocumentBatchIn) else [body]
    access.require(*(doc.namespace for doc in batch))
    _check_sizes(s.settings, batch, isinstance(body, DocumentBatchIn))
    accepted = [_submit(s.docs, doc, access) for doc in batch]
    return (
        DocumentsAccepted(documents=accepted) if isinstance(body, DocumentBatchIn) else accepted[0]
    )


@router.get(
    "/v1/documents/{doc_id}",
    response_model=DocumentOut,
    responses=problems(*GUARDED, 404, 503),
    summary="A document's status: queued, applied (with its adapter version), failed, dead, "
    "held (by the update guard), forgotten or rolled_back",
)
def get_document(s: Svc, doc_id: DocIdPath, access: Tracker) -> DocumentOut:
    record = _document(s.docs, doc_id, access)
    return DocumentOut(
        id=record.id,
        namespace=record.namespace,
        status=record.status,
        adapter_version=record.adapter_version,
        error=record.error,
        attempts=record.attempts,
        source=record.source,
        metadata=record.metadata,
        self_edits=len(record.self_edits),
        trust=record.trust,
        sequences=record.sequences,
        self_edit_sequences=record.self_edit_sequences,
        note=record.note,
        created=record.created,
        learned=record.learned,
        updated=record.updated,
    )


@router.delete(
    "/v1/documents/{doc_id}",
    status_code=202,
    response_model=Operation,
    responses=problems(*GUARDED, 404, 503),
    summary="Forget a document: its namespace's worker replays the lineage without it and "
    "publishes the result as a new version",
)
def forget_document(s: Svc, doc_id: DocIdPath, access: Admin) -> Operation:
    record = _document(s.docs, doc_id, access)
    return s.namespaces.request(record.namespace, "forget", document=doc_id)


def _check_sizes(settings: Settings, batch: list[DocumentIn], batched: bool) -> None:
    """413 for a batch or a text (a document's or a self-edit's) over this deployment's limits."""
    if len(batch) > settings.max_batch:
        raise HTTPException(
            413,
            f"a batch of {len(batch)} documents is over the limit of {settings.max_batch} "
            "(UPTAKE_MAX_BATCH); send it in parts",
        )
    for i, doc in enumerate(batch):
        where = f"document {i}" if batched else "the document"
        parts = {where: doc.text}
        parts.update((f"{where}'s self_edits[{j}]", e) for j, e in enumerate(doc.self_edits))
        for part, content in parts.items():
            if len(content) > settings.max_doc_chars:
                raise HTTPException(
                    413,
                    f"{part} has {len(content):,} characters, over the limit of "
                    f"{settings.max_doc_chars:,} (UPTAKE_MAX_DOC_CHARS); split it into parts",
                )


def _submit(docs: DocumentStore, doc: DocumentIn, access: Access) -> DocumentAccepted:
    try:
        sub = docs.submit(doc.text, doc.namespace, doc.id, doc.source, doc.metadata, doc.self_edits)
    except IdConflict as exc:
        where = f" (namespace {exc.namespace!r})" if access.covers(exc.namespace) else ""
        raise HTTPException(
            409, f"{exc}{where}; choose another id or omit it to use a content hash"
        ) from exc
    return DocumentAccepted(id=sub.id, status=sub.status, namespace=sub.namespace)


def _document(docs: DocumentStore, doc_id: str, access: Access) -> DocumentRecord:
    """The document, or 404. Another tenant's is reported as missing: a 403 would confirm that
    it exists."""
    record = docs.get(doc_id)
    if record is None or not access.covers(record.namespace):
        raise HTTPException(
            404, f"no document with id {doc_id!r}; ids come from POST /v1/documents"
        )
    return record
