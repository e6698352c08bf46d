# MoCo v3 instead of SimCLR: momentum encoder, predictor, symmetric loss; otherwise the SimCLR recipe.
_base_ = ['./simclr_vit-tiny-p8_600it_synthetic.py']
tasks = dict(contrastive=dict(head=dict(
    _delete_=True, type='MoCoV3Head', feature='cls', hidden_dim=256, out_dim=64, proj_layers=3, pred_layers=2,
    temperature=0.2, momentum=0.99)))
