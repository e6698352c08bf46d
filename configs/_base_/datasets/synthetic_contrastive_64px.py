# Contrastive learning on the embedded synthetic data: two augmented views of each classification-set image,
# labels unused. (Names are prefixed so this file combines with the other dataset bases.)
_contrastive_root = 'data/synthetic/classification'
# SimCLR / MoCo v3 augmentations scaled to 64 px (no blur: at this size it erases the shapes)
_contrastive_views = dict(type='MultiView', num_views=2, pipeline=[
    dict(type='RandomResizedCrop', size=64, scale=(0.2, 1.0), antialias=True),
    dict(type='RandomHorizontalFlip'),
    dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
    dict(type='RandomGrayscale', p=0.2),
    dict(type='ToFloat'),
    dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
_simclr_head = dict(type='SimCLRHead', feature='cls', hidden_dim=256, out_dim=64, num_layers=2, temperature=0.2)
_contrastive_task = dict(
    type='contrastive',
    head=_simclr_head,
    train_dataset=dict(type='UnlabeledImageFolder', data_root=_contrastive_root + '/train',
                       pipeline=[_contrastive_views]),
    # the same random views at evaluation (drawn from evaluation's fixed seed): can an image find its other view?
    val_dataset=dict(type='UnlabeledImageFolder', data_root=_contrastive_root + '/val', pipeline=[_contrastive_views]),
    batch_size=32, val_batch_size=100, loss_weight=1.0,
    metric=dict(type='ViewRetrieval'))
