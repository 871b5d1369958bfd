/* Classifies a few Fashion-MNIST test images with the model mpq exported and prints, for each,
 * the predicted class and the data set's label over semihosting (newlib's rdimon printf).
 * The exit status is 0 when every inference ran, 1 when mpq_model_run refused one. */
#include <stdio.h>

#include "images.h"
#include "mpq_model.h"

_Static_assert(EXAMPLE_IMAGE_BYTES == MPQ_INPUT_BYTES, "images.h was made for another model");
_Static_assert(MPQ_NUM_OUTPUTS == 1, "the classifier has one output: its logits");

/* The index of the largest logit, the first one on ties (numpy's argmax). Comparing the int8
 * values is enough: dequantisation, scale·(q − zero_point), preserves their order. */
static int argmax(const int8_t *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) {
            best = i;
        }
    }
    return best;
}

int main(void)
{
    static int8_t logits[MPQ_OUTPUT0_BYTES];
    int8_t *const outputs[MPQ_NUM_OUTPUTS] = {logits};
    int correct = 0;

    for (int i = 0; i < EXAMPLE_IMAGES; i++) {
        int rc = mpq_model_run(example_images[i], outputs);
        if (rc != 0) {
            printf("image %d: mpq_model_run failed with %d\n", i, rc);
            return 1;
        }
        int cls = argmax(logits, MPQ_OUTPUT0_BYTES);
        correct += cls == example_labels[i];
        printf("image %d: class %d (label %d)\n", i, cls, example_labels[i]);
    }
    printf("%d of %d correct\n", correct, EXAMPLE_IMAGES);
    return 0;
}
