"""Artifact registries: one interface (`Registry`), a local and a W&B implementation."""

from pipeline.registry.base import ArtifactVersion, FetchResult, FileEntry, PublishResult, Registry, VerifyReport

__all__ = ["ArtifactVersion", "FetchResult", "FileEntry", "PublishResult", "Registry", "VerifyReport"]
