"""AlignRec's objectives, one file per alignment of the paper (docs/method.md §5.5):

  ica.py  Inter-Content Alignment (stage 1): mask-then-predict pre-training of MMEnc (MLM + MIM, optional ITC).
  cca.py  Content-Category Alignment (stage 2): InfoNCE between the content (mm) view and the ID view of the
          batch's users and positive items, and the similarity-preserving loss between the learned content-view
          item similarities and the raw-feature cosine similarities.
  uia.py  User-Item Alignment (stage 2): BPR, the L2 term on the final batch embeddings, and the user-item cosine
          term.

Every function is pure and jit-able. The batch terms take per-row weights (1 = real row, 0 = padding) and the real
row count of the WHOLE batch, so a data-parallel shard's values add up to the loss of the whole batch.
"""
