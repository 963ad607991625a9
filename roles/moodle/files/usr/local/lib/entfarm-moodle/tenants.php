<?php
// entfarm-moodle tenants.php CONFIG.PHP TENANTS.JSON [--check]
//
// One course category and one cohort (in that category) per établissement, both with the UAI
// as idnumber, for the moodle role's tenants.yml (module moodle_cli, state=script). TENANTS.JSON
// is a list of {"uai", "name"}. Existing ones are left as they are (a teacher may have renamed
// the category); nothing is ever deleted. Prints {"changed": bool, "done": [...]}; with
// --check, only says what it would create.
define('CLI_SCRIPT', true);
$check = in_array('--check', $argv, true);
require($argv[1]);
require_once($CFG->dirroot . '/cohort/lib.php');

$done = [];
foreach (json_decode($argv[2], true) as $tenant) {
    $uai = strtoupper($tenant['uai']);
    $category = $DB->get_record('course_categories', ['idnumber' => $uai]);
    if (!$category) {
        $done[] = "category $uai";
        if (!$check) {
            $category = core_course_category::create([
                'name' => $tenant['name'], 'idnumber' => $uai, 'parent' => 0,
                'description' => "Cours de l'établissement $uai",
            ]);
        }
    }
    if (!$DB->record_exists('cohort', ['idnumber' => $uai])) {
        $done[] = "cohort $uai";
        if (!$check) {
            cohort_add_cohort((object) [
                'contextid' => context_coursecat::instance($category->id)->id,
                'name' => $tenant['name'], 'idnumber' => $uai, 'component' => '',
                'description' => "Personnes de l'établissement $uai", 'descriptionformat' => FORMAT_HTML,
            ]);
        }
    }
}
echo json_encode(['changed' => count($done) > 0, 'done' => $done]), "\n";
