"""The shared feature embeddings (modules/input_loading.py) on hand-set weights."""
import torch

from modules.input_loading import InputLoading, MultiHotLinear


def test_a_multi_hot_field_is_the_sigmoid_of_the_summed_columns_of_its_active_values():
    field = MultiHotLinear(3, 2)
    with torch.no_grad():
        field.weight.copy_(torch.tensor([[1.0, 5.0, 0.0], [0.0, 5.0, 2.0]]))  # columns w0 (1, 0), w1 (5, 5), w2 (0, 2)
    # values 0 and 2 active, then index 3 = padding: sigmoid(w0 + w2) = sigmoid((1, 2))
    assert torch.allclose(field(torch.tensor([[0, 2, 3]])), torch.sigmoid(torch.tensor([[1.0, 2.0]])))
    assert torch.allclose(field(torch.tensor([[3, 3]])), torch.full((1, 2), 0.5))  # nothing active: sigmoid(0)


def test_profiles_concatenate_each_fields_embedding_in_schema_order():
    features = {"user": [{"name": "gender", "kind": "categorical", "size": 2},
                         {"name": "age", "kind": "categorical", "size": 7}],
                "item": [{"name": "rate", "kind": "categorical", "size": 3},
                         {"name": "genre", "kind": "multi_hot", "size": 4}]}
    loading = InputLoading(features, 2)
    gender, age = loading.user_embeddings
    assert torch.equal(loading.user_profile(torch.tensor([[1, 5]])), torch.cat([gender.weight[1], age.weight[5]])[None])
    rate, genre = loading.item_embeddings
    profile = loading.item_profile({"rate": torch.tensor([2]), "genre": torch.tensor([[1, 4]])})
    assert torch.equal(profile, torch.cat([rate.weight[2], torch.sigmoid(genre.weight[:, 1])])[None])
