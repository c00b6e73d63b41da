"""The LSA teacher: TF-IDF followed by a truncated SVD, fitted on the training texts.

A second, offline teacher that sees the texts very differently from a transformer (word
counts, no order), so that a multi-teacher student has two views to reconcile.

Fitting uses scikit-learn (``TfidfVectorizer`` + ``TruncatedSVD``); the artefact is plain
data, never a pickle of sklearn objects (our unpickler refuses arbitrary classes)::

    <dir>/config.json        dim, min_df, max_features, seed, vocabulary size
    <dir>/vocabulary.json    the terms, in column order
    <dir>/idf.npy            (V,) float64 inverse document frequencies
    <dir>/components.npy     (dim, V) float32 SVD components
    <dir>.manifest.json      written last: the folder is complete when it exists

and :meth:`LsaModel.transform` re-implements the transform with numpy/scipy:

    x = tfidf(text) / ||tfidf(text)||,   e = C x,   embedding = e / ||e||

with ``tfidf(text)_v = count(v in text) * idf_v``. Texts are split into terms by
:func:`analyze` (whitespace split, ASCII punctuation stripped from each end, lower-cased),
which is exactly what sentence-transformers' ``BoW`` module does with such a vocabulary, so
:meth:`LsaModel.export_sentence_transformer` writes the same model as a SentenceTransformer
folder built only from stock modules (``BoW -> Normalize -> Dense -> Normalize``): the
evaluation stage reads it with ``st:<folder>``.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import (atomic_open, is_done, load_json, manifest_path, read_manifest, save_json,
                         write_manifest)
from ..errors import UserError

log = logging.getLogger("embdistill.multiteacher.lsa")

LSA_TEACHER = "lsa"  # the teacher name that selects this model (scripts, folders, specs)
FIT_PARAMS = ("dim", "min_df", "max_features", "seed")
ENCODE_BATCH = 4096  # texts per sparse block in transform: bounds memory, not results


def analyze(text: str) -> list[str]:
    """The terms of a text: whitespace tokens, ASCII punctuation stripped, lower-cased."""
    terms = (token.strip(string.punctuation).lower() for token in text.split())
    return [term for term in terms if term]


@dataclass
class LsaModel:
    vocabulary: list[str]
    idf: np.ndarray  # (V,) float64
    components: np.ndarray  # (dim, V) float32
    config: dict

    def __post_init__(self):
        self._column = {term: i for i, term in enumerate(self.vocabulary)}

    @property
    def hidden_size(self) -> int:
        return int(self.components.shape[0])

    def transform(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32 unit vectors (a text with no known term maps to zeros)."""
        blocks = [self._transform_block(texts[i : i + ENCODE_BATCH])
                  for i in range(0, len(texts), ENCODE_BATCH)]
        return np.concatenate(blocks) if blocks else np.zeros((0, self.hidden_size), np.float32)

    def _transform_block(self, texts: list[str]) -> np.ndarray:
        from scipy.sparse import csr_matrix

        rows, cols = [], []
        for row, text in enumerate(texts):
            for term in analyze(text):
                column = self._column.get(term)
                if column is not None:
                    rows.append(row)
                    cols.append(column)
        counts = csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(self.vocabulary))
        )  # duplicate (row, col) entries are summed: term counts
        tfidf = counts.multiply(self.idf[None, :]).tocsr()
        tfidf = tfidf.multiply(1.0 / _norms(np.sqrt(tfidf.multiply(tfidf).sum(1)))).tocsr()
        reduced = np.asarray(tfidf @ self.components.T.astype(np.float64))
        return (reduced / _norms(np.linalg.norm(reduced, axis=1, keepdims=True))).astype(np.float32)

    def encode(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """The teacher interface of the shard stage (the batch size does not apply)."""
        return self.transform(list(texts))

    @property
    def fit_params(self) -> dict:
        """The settings it was fitted with: its manifest's config."""
        return {key: self.config[key] for key in FIT_PARAMS}

    def save(self, folder: str | Path, inputs: dict | None = None) -> None:
        """Write the artefact (module docstring); the manifest goes last. ``inputs``: the
        files it was fitted on, fingerprinted in the manifest."""
        folder = Path(folder)
        manifest_path(folder).unlink(missing_ok=True)  # stale until the new files are all in
        save_json(self.config, folder / "config.json")
        save_json(self.vocabulary, folder / "vocabulary.json")
        for name, array in (("idf", self.idf), ("components", self.components)):
            with atomic_open(folder / f"{name}.npy", "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        write_manifest(folder, stage="lsa", config=self.fit_params, inputs=inputs)

    @classmethod
    def load(cls, folder: str | Path) -> "LsaModel":
        folder = Path(folder)
        if read_manifest(folder) is None:
            raise UserError(f"{folder}: no complete LSA model (fit it with scripts/10_teacher_embeddings.py)")
        try:
            idf = np.load(folder / "idf.npy", allow_pickle=False)
            components = np.load(folder / "components.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder}: corrupt LSA model ({exc})") from None
        vocabulary = load_json(folder / "vocabulary.json")
        if not (idf.shape == (len(vocabulary),) and components.ndim == 2
                and components.shape[1] == len(vocabulary)):
            raise UserError(
                f"{folder}: inconsistent LSA model (vocabulary {len(vocabulary)}, idf "
                f"{idf.shape}, components {components.shape})"
            )
        return cls(vocabulary, idf, components, load_json(folder / "config.json"))

    def export_sentence_transformer(self, out_dir: str | Path) -> Path:
        """The same model as a SentenceTransformer folder of stock modules (module docstring)."""
        import torch
        from sentence_transformers import SentenceTransformer

        from ..students import sentence_transformer_modules

        BoW, Dense, Normalize = (getattr(sentence_transformer_modules(), name)
                                 for name in ("BoW", "Dense", "Normalize"))
        bow = BoW(self.vocabulary, dict(zip(self.vocabulary, self.idf.tolist())),
                  cumulative_term_frequency=True)
        dense = Dense(len(self.vocabulary), self.hidden_size, bias=False, activation_function=None,
                      init_weight=torch.from_numpy(self.components.astype(np.float32)))
        model = SentenceTransformer(modules=[bow, Normalize(), dense, Normalize()], device="cpu")
        out_dir = Path(out_dir)
        model.save(str(out_dir))
        return out_dir


def _norms(norms: np.ndarray) -> np.ndarray:
    """Row norms with zeros replaced by 1, so that empty rows stay zero (as sklearn does)."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.where(norms == 0, 1.0, norms)


def fit_lsa(texts: list[str], dim: int = 256, min_df: int = 2, max_features: int | None = 30000,
            seed: int = 0) -> LsaModel:
    """Fit TF-IDF (terms from :func:`analyze`) and a ``dim``-component truncated SVD."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer=analyze, min_df=min(min_df, len(texts)),
                                 max_features=max_features)
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError as exc:  # "empty vocabulary", ...
        raise UserError(f"LSA: cannot build a vocabulary from {len(texts)} texts ({exc})") from None
    n_terms = tfidf.shape[1]
    if dim >= n_terms:
        raise UserError(
            f"LSA: dimension {dim} needs more than {dim} distinct terms; the corpus has {n_terms} "
            "(lower --lsa-dim or --lsa-min-df)"
        )
    svd = TruncatedSVD(n_components=dim, random_state=seed).fit(tfidf)
    vocabulary = [None] * n_terms
    for term, column in vectorizer.vocabulary_.items():
        vocabulary[column] = term
    config = {"dim": dim, "min_df": min_df, "max_features": max_features, "seed": seed,
              "n_texts": len(texts), "n_terms": n_terms,
              "explained_variance": float(svd.explained_variance_ratio_.sum())}
    log.info("LSA: %d texts, %d terms, %d dims (%.1f%% of the variance)", len(texts), n_terms,
             dim, 100 * config["explained_variance"])
    return LsaModel(vocabulary, vectorizer.idf_.astype(np.float64),
                    svd.components_.astype(np.float32), config)


def prepare_lsa(folder: Path, texts: list[str], corpus_file: Path, *, dim: int, min_df: int,
                max_features: int | None, seed: int, overwrite: bool = False) -> None:
    """Fit the LSA teacher on ``texts`` into ``folder/model`` and export it to
    ``folder/sentence-transformer``, unless both are done with these settings."""
    params = {"dim": dim, "min_df": min_df, "max_features": max_features, "seed": seed}
    model_dir, st_dir = lsa_dirs(folder)
    if overwrite or not is_done(model_dir, config=params, inputs={"corpus": corpus_file}):
        fit_lsa(texts, dim, min_df, max_features, seed).save(model_dir, inputs={"corpus": corpus_file})
    else:
        log.info("LSA: %s is up to date, skipping (--overwrite to redo)", model_dir)
    if overwrite or not is_done(st_dir, config=params, inputs={"model": model_dir}):
        manifest_path(st_dir).unlink(missing_ok=True)
        LsaModel.load(model_dir).export_sentence_transformer(st_dir)
        write_manifest(st_dir, stage="lsa_export", config=params, inputs={"model": model_dir})


def lsa_dirs(folder: Path) -> tuple[Path, Path]:
    """(the artefact, its SentenceTransformer export) in an LSA teacher's embeddings folder."""
    return Path(folder) / "model", Path(folder) / "sentence-transformer"
